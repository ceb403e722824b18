//! The tc programs on the node's external interfaces: thin entry points over the packet
//! level ([`crate::packet`]), which does the work for tc and XDP alike.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{ctx::Ctx, packet};

/// Every packet arriving on an external interface (after XDP, when XDP is on).
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    packet::ingress(&ctx)
}

/// Every packet leaving by an external interface. What egress translates comes from
/// elsewhere: a pod's veth (a local backend's reply) or the node itself (a
/// host-network backend, the stack's refusals and ICMP errors). A packet that came in
/// by this very interface is one ingress redirected (a SNATed flow's, either way):
/// nothing to do, and no lookup to pay.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context's sk_buff is valid for the program's run.
    let (in_if, out_if) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
    if in_if == out_if {
        return TcContext::NEXT;
    }
    packet::egress(&ctx)
}
