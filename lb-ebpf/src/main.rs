//! Kernel side of the load balancer: socket-level service translation.
//!
//! `cgroup/connect4` sees every connect() of a process in the cgroup tree it is attached
//! to. When the destination is a service frontend (ClusterIP:port) it picks one backend
//! at random and rewrites the destination to the backend's pod IP:targetPort, once, so
//! the connection then flows with no per-packet NAT.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::HashMap,
    helpers::{bpf_get_prandom_u32, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend4, MAX_BACKENDS, MAX_REVNAT, MAX_SERVICE_ENTRIES, PROTO_TCP, PROTO_UDP, RevNat4,
    ServiceKey4, ServiceValue, pick_slot,
};

/// Frontend (address, port, protocol, scope, slot) -> header (slot 0) or backend id.
#[btf_map]
static LB4_SERVICES_V1: HashMap<ServiceKey4, ServiceValue, { MAX_SERVICE_ENTRIES as usize }> =
    HashMap::new();

/// Backend id -> pod address and port.
#[btf_map]
static LB4_BACKENDS_V1: HashMap<u32, Backend4, { MAX_BACKENDS as usize }> = HashMap::new();

/// rev-NAT id -> frontend address and port (read by getpeername/recvmsg, later issues).
#[btf_map]
static LB4_REVNAT_V1: HashMap<u16, RevNat4, { MAX_REVNAT as usize }> = HashMap::new();

/// `connect()` may go on (the destination may have been rewritten).
const ALLOW: i32 = 1;
/// `connect()` fails with the errno set by `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What happened to one connect().
enum Verdict {
    /// Not a service frontend: left alone.
    Pass,
    /// Destination rewritten to a backend.
    Translated,
    /// A service frontend without a usable backend: refuse like kube-proxy's REJECT.
    Refused,
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Verdict::Pass | Verdict::Translated => ALLOW,
        Verdict::Refused => {
            // SAFETY: a helper call with a plain integer; allowed in cgroup/connect4.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> Verdict {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for its whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == u32::from(PROTO_TCP) => PROTO_TCP,
        p if p == u32::from(PROTO_UDP) => PROTO_UDP,
        _ => return Verdict::Pass,
    };
    // user_ip4: network-order address as stored in memory; user_port: network-order port
    // in the low 16 bits.
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey4::new(addr, port, proto, 0);

    // SAFETY: values are copied out at once; the agent never changes an entry in place
    // in a way that could tear a field we rely on (it writes whole values).
    let Some(header) = (unsafe { LB4_SERVICES_V1.get(key) }).copied() else {
        return Verdict::Pass;
    };
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let Some(slot) = pick_slot(header.count, random) else {
        debug!(
            ctx,
            "connect4: no backend for {:i}:{}",
            u32::from_be_bytes(addr),
            port
        );
        return Verdict::Refused;
    };
    // A slot or backend may vanish between the lookups while the agent shrinks the
    // service; slot 1 exists as long as the service has a backend, so try it next. If
    // that fails too the service is being deleted: leave the connection untouched.
    let Some((backend_id, backend)) = backend_at(key, slot).or_else(|| backend_at(key, 1)) else {
        return Verdict::Pass;
    };
    sa.user_ip4 = u32::from_ne_bytes(backend.addr);
    sa.user_port = u32::from(backend.port.to_be());
    debug!(
        ctx,
        "connect4: {:i}:{} -> backend {} {:i}:{}",
        u32::from_be_bytes(addr),
        port,
        backend_id,
        u32::from_be_bytes(backend.addr),
        backend.port
    );
    Verdict::Translated
}

/// The backend in one slot of a frontend.
#[inline(always)]
fn backend_at(key: ServiceKey4, slot: u16) -> Option<(u32, Backend4)> {
    // SAFETY: copied out at once (see above).
    let id = unsafe { LB4_SERVICES_V1.get(key.with_slot(slot)) }?.backend_id;
    let backend = unsafe { LB4_BACKENDS_V1.get(id) }.copied()?;
    Some((id, backend))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
