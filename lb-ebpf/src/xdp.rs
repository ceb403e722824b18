//! The XDP program on the node's external interfaces: a thin entry point over the
//! packet level ([`crate::packet`]), the same code the tc programs run. It translates
//! what it can at the driver and passes everything else on (`XDP_PASS`) to tc ingress,
//! which keeps what XDP cannot do (a next hop whose address the kernel has not
//! resolved yet); replies of this node's own backends leave through tc egress.

use aya_ebpf::{macros::xdp, programs::XdpContext};

use crate::packet;

/// Every frame arriving on an external interface, before the stack sees it.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    packet::ingress(&ctx) as u32
}
