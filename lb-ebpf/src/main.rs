//! Kernel side of the load balancer: socket-level service translation.
//!
//! `cgroup/connect4` sees every connect() of a process in the cgroup tree it is attached
//! to. When the destination is a service frontend (ClusterIP:port) it picks one backend
//! at random and rewrites the destination to the backend's pod IP:targetPort, once, so
//! the connection then flows with no per-packet NAT. `sendmsg4` does the same for every
//! datagram of an unconnected UDP socket; `recvmsg4` and `getpeername4` turn the backend
//! back into the service address, from a per-socket rev-NAT entry.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend4, Counters, MAX_BACKENDS, MAX_REVNAT, MAX_SERVICE_ENTRIES, MAX_SOCK_REVNAT,
    PROG_CONNECT4, PROG_GETPEERNAME4, PROG_NAMES, PROG_RECVMSG4, PROG_SENDMSG4, PROTO_TCP,
    PROTO_UDP, RevNat4, ServiceKey4, ServiceValue, SockRevNatKey4, pick_slot,
};

/// Frontend (address, port, protocol, scope, slot) -> header (slot 0) or backend id.
#[btf_map]
static LB4_SERVICES_V1: HashMap<ServiceKey4, ServiceValue, { MAX_SERVICE_ENTRIES as usize }> =
    HashMap::new();

/// Backend id -> pod address and port.
#[btf_map]
static LB4_BACKENDS_V1: HashMap<u32, Backend4, { MAX_BACKENDS as usize }> = HashMap::new();

/// rev-NAT id -> frontend address and port.
#[btf_map]
static LB4_REVNAT_V1: HashMap<u16, RevNat4, { MAX_REVNAT as usize }> = HashMap::new();

/// (socket cookie, backend) -> the frontend that socket asked for: what getpeername()
/// and recvmsg() report instead of the backend.
#[btf_map]
static LB4_SOCK_REVNAT_V1: LruHashMap<SockRevNatKey4, RevNat4, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// Per-program counters, indexed by `PROG_*`.
#[btf_map]
static LB_COUNTERS_V1: PerCpuArray<Counters, { PROG_NAMES.len() }> = PerCpuArray::new();

/// The call may go on (the address may have been rewritten).
const ALLOW: i32 = 1;
/// The call fails with the errno set by `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What happened to one connect() or sendmsg().
enum Verdict {
    /// Not a service frontend: left alone.
    Pass,
    /// Destination rewritten to a backend.
    Translated,
    /// A service frontend without a usable backend: refuse like kube-proxy's REJECT.
    Refused,
}

#[inline(always)]
fn count(prog: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = LB_COUNTERS_V1.get_ptr_mut(prog) {
        // SAFETY: a per-CPU slot: nothing else on this CPU runs this program concurrently.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, prog: u32) -> i32 {
    match try_forward(ctx, prog) {
        Verdict::Pass => ALLOW,
        Verdict::Translated => {
            count(prog, |c| c.translated += 1);
            ALLOW
        }
        Verdict::Refused => {
            count(prog, |c| c.refused += 1);
            // SAFETY: a helper call with a plain integer; allowed in sock_addr programs.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

/// TCP and connected UDP: the destination is rewritten once, at connect().
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, PROG_CONNECT4)
}

/// Unconnected UDP: the destination of every datagram is rewritten.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, PROG_SENDMSG4)
}

/// Unconnected UDP: replies from a backend appear to come from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_RECVMSG4);
    ALLOW
}

/// getpeername() on a translated socket reports the service, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_GETPEERNAME4);
    ALLOW
}

#[inline(always)]
fn try_forward(ctx: &SockAddrContext, prog: u32) -> Verdict {
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

    // SAFETY: values are copied out at once; the agent writes whole values.
    let Some(header) = (unsafe { LB4_SERVICES_V1.get(key) }).copied() else {
        return Verdict::Pass;
    };
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let Some(slot) = pick_slot(header.count, random) else {
        debug!(
            ctx,
            "{}: no backend for {:i}:{}",
            PROG_NAMES[prog as usize & 3],
            u32::from_be_bytes(addr),
            port
        );
        return Verdict::Refused;
    };
    // A slot or backend may vanish between the lookups while the agent shrinks the
    // service; slot 1 exists as long as the service has a backend, so try it next. If
    // that fails too the service is being deleted: leave the call untouched.
    let found = match backend_at(key, slot) {
        Some(b) => Some(b),
        None => {
            count(prog, |c| c.misses += 1);
            backend_at(key, 1)
        }
    };
    let Some((backend_id, backend)) = found else {
        return Verdict::Pass;
    };
    sa.user_ip4 = u32::from_ne_bytes(backend.addr);
    sa.user_port = u32::from(backend.port.to_be());
    // SAFETY: the context is a sock_addr context, for which the helper is allowed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNatKey4 {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 2],
    };
    let frontend = RevNat4 {
        addr,
        port,
        _pad: [0; 2],
    };
    if LB4_SOCK_REVNAT_V1.insert(rev_key, frontend, 0).is_err() {
        count(prog, |c| c.misses += 1);
    }
    debug!(
        ctx,
        "{}: {:i}:{} -> backend {} {:i}:{}",
        PROG_NAMES[prog as usize & 3],
        u32::from_be_bytes(addr),
        port,
        backend_id,
        u32::from_be_bytes(backend.addr),
        backend.port
    );
    Verdict::Translated
}

/// Rewrites a backend peer address back to the frontend the socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, prog: u32) {
    // SAFETY: as in try_forward.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: as in try_forward.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey4 {
        cookie,
        addr: sa.user_ip4.to_ne_bytes(),
        port: u16::from_be(sa.user_port as u16),
        _pad: [0; 2],
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { LB4_SOCK_REVNAT_V1.get(key) }.copied() {
        sa.user_ip4 = u32::from_ne_bytes(frontend.addr);
        sa.user_port = u32::from(frontend.port.to_be());
        count(prog, |c| c.translated += 1);
    }
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
