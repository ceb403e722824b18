//! Kernel side of the load balancer: socket-level service translation.
//!
//! `cgroup/connect4` and `connect6` see every connect() of a process in the cgroup tree
//! they are attached to. When the destination is a service frontend (a ClusterIP, node
//! address with a nodePort, externalIP or LoadBalancer IP, with the port) they pick a
//! backend, at random or from the client's ClientIP affinity entry, and rewrite the
//! destination to the backend's pod IP:targetPort, once, so the connection then flows with
//! no per-packet NAT. `sendmsg4/6` do the same for every datagram of an unconnected UDP
//! socket; `recvmsg4/6` and `getpeername4/6` turn the backend back into the service
//! address, from a per-socket rev-NAT entry. Addresses of both families share one map
//! layout (IPv4 as `::ffff:a.b.c.d`, see `lb_common::Addr`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Addr, AffinityKey, AffinityValue, Backend, Counters, MAX_AFFINITY, MAX_BACKENDS, MAX_REVNAT,
    MAX_SERVICE_ENTRIES, MAX_SOCK_REVNAT, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4,
    PROG_GETPEERNAME6, PROG_NAMES, PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6,
    PROTO_TCP, PROTO_UDP, RevNat, ServiceKey, ServiceValue, SockRevNatKey, affinity_valid, as_v4,
    pick_slot, v4_mapped,
};

/// Frontend (address, port, protocol, scope, slot) -> header (slot 0) or backend id.
#[btf_map]
static LB_SERVICES_V2: HashMap<ServiceKey, ServiceValue, { MAX_SERVICE_ENTRIES as usize }> =
    HashMap::new();

/// Backend id -> pod address and port.
#[btf_map]
static LB_BACKENDS_V2: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// rev-NAT id -> frontend address and port.
#[btf_map]
static LB_REVNAT_V2: HashMap<u16, RevNat, { MAX_REVNAT as usize }> = HashMap::new();

/// (socket cookie, backend) -> the frontend that socket asked for: what getpeername()
/// and recvmsg() report instead of the backend.
#[btf_map]
static LB_SOCK_REVNAT_V2: LruHashMap<SockRevNatKey, RevNat, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// (client network namespace, frontend) -> backend and last use: ClientIP affinity.
#[btf_map]
static LB_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Per-program counters, indexed by `PROG_*`.
#[btf_map]
static LB_COUNTERS_V2: PerCpuArray<Counters, { PROG_NAMES.len() }> = PerCpuArray::new();

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
    if let Some(c) = LB_COUNTERS_V2.get_ptr_mut(prog) {
        // SAFETY: a per-CPU slot: nothing else on this CPU runs this program concurrently.
        f(unsafe { &mut *c });
    }
}

/// The address family a program handles; picks the `bpf_sock_addr` fields it uses.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// The user-supplied address (destination for connect/sendmsg, peer for
/// recvmsg/getpeername) as an [`Addr`]. Both `user_ip4` and each `user_ip6` word hold
/// network-order bytes as stored in memory, so `to_ne_bytes` gives the wire octets.
#[inline(always)]
fn user_addr(sa: &bpf_sock_addr, family: Family) -> Addr {
    match family {
        Family::V4 => v4_mapped(sa.user_ip4.to_ne_bytes()),
        Family::V6 => {
            let mut a = [0u8; 16];
            let words = [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ];
            let mut i = 0;
            while i < 4 {
                let b = words[i].to_ne_bytes();
                a[i * 4] = b[0];
                a[i * 4 + 1] = b[1];
                a[i * 4 + 2] = b[2];
                a[i * 4 + 3] = b[3];
                i += 1;
            }
            a
        }
    }
}

/// Writes `addr:port` as the user address. An IPv4 program can only take an IPv4
/// (mapped) address: `false` (and nothing written) for a real IPv6 one. An IPv6 program
/// writes the mapped form, which a dual-stack socket connects with.
#[inline(always)]
fn set_user_addr(sa: &mut bpf_sock_addr, family: Family, addr: &Addr, port: u16) -> bool {
    match family {
        Family::V4 => {
            let Some(v4) = as_v4(addr) else {
                return false;
            };
            sa.user_ip4 = u32::from_ne_bytes(v4);
        }
        Family::V6 => {
            sa.user_ip6[0] = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
            sa.user_ip6[1] = u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]);
            sa.user_ip6[2] = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
            sa.user_ip6[3] = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
        }
    }
    // user_port: network-order port in the low 16 bits.
    sa.user_port = u32::from(port.to_be());
    true
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, prog: u32, family: Family) -> i32 {
    match try_forward(ctx, prog, family) {
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
    forward(&ctx, PROG_CONNECT4, Family::V4)
}

/// Unconnected UDP: the destination of every datagram is rewritten.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, PROG_SENDMSG4, Family::V4)
}

/// Unconnected UDP: replies from a backend appear to come from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_RECVMSG4, Family::V4);
    ALLOW
}

/// getpeername() on a translated socket reports the service, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_GETPEERNAME4, Family::V4);
    ALLOW
}

/// connect4 for IPv6 sockets (and IPv4-mapped destinations of dual-stack sockets).
#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, PROG_CONNECT6, Family::V6)
}

/// sendmsg4 for IPv6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, PROG_SENDMSG6, Family::V6)
}

/// recvmsg4 for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_RECVMSG6, Family::V6);
    ALLOW
}

/// getpeername4 for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, PROG_GETPEERNAME6, Family::V6);
    ALLOW
}

#[inline(always)]
fn try_forward(ctx: &SockAddrContext, prog: u32, family: Family) -> Verdict {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for its whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == u32::from(PROTO_TCP) => PROTO_TCP,
        p if p == u32::from(PROTO_UDP) => PROTO_UDP,
        _ => return Verdict::Pass,
    };
    let addr = user_addr(sa, family);
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey::new(addr, port, proto, 0);

    // SAFETY: values are copied out at once; the agent writes whole values.
    let Some(header) = (unsafe { LB_SERVICES_V2.get(key) }).copied() else {
        return Verdict::Pass;
    };
    if header.count == 0 {
        debug!(
            ctx,
            "{}: no backend for {:i}:{}",
            PROG_NAMES[prog as usize & 7],
            addr,
            port
        );
        return Verdict::Refused;
    }
    let affinity = (header.affinity_timeout != 0).then(|| {
        // SAFETY: helpers allowed in sock_addr programs, on the program's own context.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let now = unsafe { bpf_ktime_get_ns() };
        let key = AffinityKey {
            netns_cookie,
            rev_nat_id: header.rev_nat_id,
            _pad: [0; 6],
        };
        (key, now)
    });
    // A remembered backend that is still valid and still exists wins; the agent deletes
    // the entries of backends that leave the service.
    let remembered = affinity.and_then(|(akey, now)| {
        // SAFETY: copied out at once.
        let entry = unsafe { LB_AFFINITY_V1.get(akey) }.copied()?;
        if !affinity_valid(entry.last_used_ns, now, header.affinity_timeout) {
            return None;
        }
        // SAFETY: copied out at once.
        let backend = unsafe { LB_BACKENDS_V2.get(entry.backend_id) }.copied()?;
        count(prog, |c| c.affinity_hits += 1);
        Some((entry.backend_id, backend))
    });
    let found = match remembered {
        Some(b) => Some(b),
        None => {
            // SAFETY: a helper without arguments.
            let random = unsafe { bpf_get_prandom_u32() };
            let slot = pick_slot(header.count, random).unwrap_or(1);
            // A slot or backend may vanish between the lookups while the agent shrinks
            // the service; slot 1 exists as long as the service has a backend, so try
            // it next. If that fails too the service is being deleted: leave the call
            // untouched.
            match backend_at(key, slot) {
                Some(b) => Some(b),
                None => {
                    count(prog, |c| c.misses += 1);
                    backend_at(key, 1)
                }
            }
        }
    };
    let Some((backend_id, backend)) = found else {
        return Verdict::Pass;
    };
    if !set_user_addr(sa, family, &backend.addr, backend.port) {
        count(prog, |c| c.misses += 1);
        return Verdict::Pass;
    }
    if let Some((akey, now)) = affinity {
        let value = AffinityValue {
            backend_id,
            _pad: [0; 4],
            last_used_ns: now,
        };
        if LB_AFFINITY_V1.insert(akey, value, 0).is_err() {
            count(prog, |c| c.misses += 1);
        }
    }
    // SAFETY: the context is a sock_addr context, for which the helper is allowed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let frontend = RevNat {
        addr,
        port,
        _pad: [0; 2],
    };
    if LB_SOCK_REVNAT_V2.insert(rev_key, frontend, 0).is_err() {
        count(prog, |c| c.misses += 1);
    }
    debug!(
        ctx,
        "{}: {:i}:{} -> backend {} {:i}:{}",
        PROG_NAMES[prog as usize & 7],
        addr,
        port,
        backend_id,
        backend.addr,
        backend.port
    );
    Verdict::Translated
}

/// Rewrites a backend peer address back to the frontend the socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, prog: u32, family: Family) {
    // SAFETY: as in try_forward.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: as in try_forward.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: user_addr(sa, family),
        port: u16::from_be(sa.user_port as u16),
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { LB_SOCK_REVNAT_V2.get(key) }.copied() {
        if set_user_addr(sa, family, &frontend.addr, frontend.port) {
            count(prog, |c| c.translated += 1);
        } else {
            count(prog, |c| c.misses += 1);
        }
    }
}

/// The backend in one slot of a frontend.
#[inline(always)]
fn backend_at(key: ServiceKey, slot: u16) -> Option<(u32, Backend)> {
    // SAFETY: copied out at once (see above).
    let id = unsafe { LB_SERVICES_V2.get(key.with_slot(slot)) }?.backend_id;
    let backend = unsafe { LB_BACKENDS_V2.get(id) }.copied()?;
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
