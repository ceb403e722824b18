//! Kernel side of the load balancer, one module per hook, with what they share apart:
//!
//! * [`maps`]: every map (their names are what `bpftool` and the agent's pins see, so
//!   they live in one place) and the per-program counters;
//! * [`lb`]: the service lookup and backend choice (slots, ClientIP affinity) that every
//!   hook that translates a destination uses;
//! * [`sock`]: the cgroup sock_addr programs (`connect`, `sendmsg`, `recvmsg`,
//!   `getpeername`, for IPv4 and IPv6): socket-level translation at connect() time;
//! * [`packet`]: packet-level translation for clients outside the node, written once
//!   over [`ctx::Ctx`] (one packet API over the tc and XDP contexts), with [`ct`]
//!   (connection tracking) and [`nat`] (parsing and rewriting packets);
//! * [`tc`] and [`xdp`]: the programs on the node's external interfaces, thin entry
//!   points into [`packet`].
//!
//! Addresses of both families share one map layout (IPv4 as `::ffff:a.b.c.d`, see
//! `lb_common::Addr`).
#![no_std]
#![no_main]

mod ct;
mod ctx;
mod lb;
mod maps;
mod nat;
mod packet;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
