//! The cgroup sock_addr programs: socket-level translation.
//!
//! `cgroup/connect4` and `connect6` see every connect() of a process in the cgroup tree
//! they are attached to. When the destination is a service frontend (a ClusterIP, node
//! address with a nodePort, externalIP or LoadBalancer IP, with the port) they pick a
//! backend, at random or from the client's ClientIP affinity entry, and rewrite the
//! destination to the backend's pod IP:targetPort, once, so the connection then flows with
//! no per-packet NAT. `sendmsg4/6` do the same for every datagram of an unconnected UDP
//! socket, keeping the socket on the backend it was sent to before while that backend
//! is in the service (the socket's record in `LB_SOCKS_V1`); `recvmsg4/6` and
//! `getpeername4/6` turn the backend back into the service address, from a per-socket
//! rev-NAT entry. `sock_release` deletes a closing socket's rev-NAT entries and record.
//!
//! Built with the feature `no-set-retval` (the agent's second object, for kernels before
//! 6.1 whose sock_addr programs cannot call `bpf_set_retval`), a refusal only returns 0:
//! the kernel then fails connect() and sendmsg() with EPERM instead of ECONNREFUSED or
//! EHOSTUNREACH. Those programs also use the map [`LB_SOCK_EPERM`], by which `lb-user
//! dump` tells the two objects apart.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::debug;
use bytemuck::Zeroable as _;
use lb_common::{
    Addr, AffinityKey, Backend, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4, PROG_GETPEERNAME6,
    PROG_NAMES, PROG_RECVMSG4, PROG_RECVMSG6, PROG_SENDMSG4, PROG_SENDMSG6, PROTO_TCP, PROTO_UDP,
    RevNat, SOCK_FRONTENDS, SVC_F_NO_LOCAL, ServiceKey, ServiceValue, SockFrontend, SockRecord,
    SockRevNatKey, as_v4, v4_mapped,
};

use crate::{
    lb::{self, Chosen},
    maps::{LB_SOCK_REVNAT_V2, LB_SOCKS_V1, count},
};

/// The call may go on (the address may have been rewritten).
const ALLOW: i32 = 1;
/// The call fails with the errno set by `bpf_set_retval` (EPERM when none was set).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Only in the object built without `bpf_set_retval`: a one-entry map that the refusing
/// path reads, so the programs of that object list it among their maps (`lb-user dump`
/// reads the attached connect4 program's maps to say which object runs). Not pinned.
#[cfg(feature = "no-set-retval")]
#[aya_ebpf::macros::btf_map]
pub static LB_SOCK_EPERM: aya_ebpf::btf_maps::Array<u8, 1> = aya_ebpf::btf_maps::Array::new();

/// Makes the call fail with `errno` where the kernel lets sock_addr programs set it
/// (Linux 6.1); in the object built without `bpf_set_retval` the call fails with EPERM.
#[inline(always)]
fn refuse(errno: i32) -> i32 {
    #[cfg(not(feature = "no-set-retval"))]
    // SAFETY: a helper call with a plain integer; allowed in sock_addr programs.
    unsafe {
        aya_ebpf::helpers::bpf_set_retval(-errno)
    };
    #[cfg(feature = "no-set-retval")]
    {
        let _ = errno;
        let _ = LB_SOCK_EPERM.get(0);
    }
    REJECT
}

/// What happened to one connect() or sendmsg().
enum Verdict {
    /// Not a service frontend: left alone.
    Pass,
    /// Destination rewritten to a backend.
    Translated,
    /// A service frontend without a usable backend: refuse like kube-proxy's REJECT.
    Refused,
    /// A service whose endpoints are all on other nodes while its traffic policy is
    /// Local (kube-proxy drops): refused with another errno, counted apart.
    NoLocal,
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
            refuse(ECONNREFUSED)
        }
        Verdict::NoLocal => {
            count(prog, |c| c.no_local += 1);
            refuse(EHOSTUNREACH)
        }
    }
}

/// TCP and connected UDP: the destination is rewritten once, at connect().
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    upgrade_test_mark();
    forward(&ctx, PROG_CONNECT4, Family::V4)
}

/// Built with `--cfg lb_upgrade_test` (`LB_EBPF_CFG`), the programs read one more global:
/// other instructions, so another program tag, and nothing else different. The restart
/// tests upgrade to such a build and check that the kernel runs the new programs.
#[inline(always)]
fn upgrade_test_mark() {
    #[cfg(lb_upgrade_test)]
    {
        static UPGRADE_TEST_MARK: u32 = 1;
        // SAFETY: a read of a static.
        let _ = unsafe { core::ptr::read_volatile(&UPGRADE_TEST_MARK) };
    }
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

/// Steps: the frontend's header; no backend -> refuse; else the affinity entry, the
/// socket's own backend (unconnected UDP) or a random slot; rewrite; remember the choice
/// (affinity), the frontend (rev-NAT) and the socket's backend.
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
    let Some(header) = lb::header(key) else {
        return Verdict::Pass;
    };
    if header.count == 0 {
        debug!(
            ctx,
            "{}: no backend for {:i}:{}",
            prog_name(prog),
            addr,
            port
        );
        if header.flags & SVC_F_NO_LOCAL != 0 {
            return Verdict::NoLocal;
        }
        return Verdict::Refused;
    }
    // SAFETY: the context is a sock_addr context, for which the helper is allowed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let affinity = (header.affinity_timeout != 0).then(|| affinity_key(ctx, header.rev_nat_id));
    let Some(chosen) = choose(key, &header, affinity, cookie, prog) else {
        return Verdict::Pass;
    };
    if !set_user_addr(sa, family, &chosen.backend.addr, chosen.backend.port) {
        count(prog, |c| c.misses += 1);
        return Verdict::Pass;
    }
    if let Some((akey, now)) = affinity {
        lb::remember(akey, now, &chosen, header.epoch, prog);
    }
    remember_frontend(cookie, &chosen.backend, addr, port, prog);
    remember_socket(cookie, header.rev_nat_id, &chosen, prog);
    debug!(
        ctx,
        "{}: {:i}:{} -> backend {} {:i}:{}",
        prog_name(prog),
        addr,
        port,
        chosen.id,
        chosen.backend.addr,
        chosen.backend.port
    );
    Verdict::Translated
}

/// The backend for this call: the client's affinity entry; for sendmsg, the backend the
/// socket was sent to before if it is still the frontend's (an unconnected UDP socket
/// keeps its backend, as a connected one does); else a random slot.
#[inline(always)]
fn choose(
    key: ServiceKey,
    header: &ServiceValue,
    affinity: Option<(AffinityKey, u64)>,
    cookie: u64,
    prog: u32,
) -> Option<Chosen> {
    if let Some(c) = affinity.and_then(|(akey, now)| lb::remembered(akey, now, header, prog)) {
        return Some(c);
    }
    if prog == PROG_SENDMSG4 || prog == PROG_SENDMSG6 {
        // SAFETY: copied out at once.
        let record = unsafe { LB_SOCKS_V1.get(cookie) }.copied();
        if let Some(f) = record.and_then(|r| frontend_of(&r, header.rev_nat_id))
            && let Some(c) = lb::stuck(key, header, f.backend_id, f.slot)
        {
            return Some(c);
        }
    }
    // SAFETY: a helper without arguments.
    lb::pick(key, header, unsafe { bpf_get_prandom_u32() }, prog)
}

/// The entry of `record` for the frontend `rev_nat_id`, if any.
#[inline(always)]
fn frontend_of(record: &SockRecord, rev_nat_id: u16) -> Option<SockFrontend> {
    let mut i = 0;
    while i < SOCK_FRONTENDS {
        if record.frontends[i].rev_nat_id == rev_nat_id {
            return Some(record.frontends[i]);
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn prog_name(prog: u32) -> &'static str {
    PROG_NAMES[prog as usize & 7]
}

/// The socket level's affinity client is the caller's network namespace (at connect()
/// the source address is often not chosen yet); with the time now.
#[inline(always)]
fn affinity_key(ctx: &SockAddrContext, rev_nat_id: u16) -> (AffinityKey, u64) {
    // SAFETY: helpers allowed in sock_addr programs, on the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey {
        netns_cookie,
        rev_nat_id,
        _pad: [0; 6],
    };
    (key, now)
}

/// Records, for this socket and backend, the frontend it asked for: what recvmsg() and
/// getpeername() report. Looked up first: a socket sending to its backend again writes
/// nothing (and its entry counts as used, so the LRU keeps it).
#[inline(always)]
fn remember_frontend(cookie: u64, backend: &Backend, addr: Addr, port: u16, prog: u32) {
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
    // SAFETY: only compared.
    if unsafe { LB_SOCK_REVNAT_V2.get(rev_key) }.is_some_and(|v| *v == frontend) {
        return;
    }
    if LB_SOCK_REVNAT_V2.insert(rev_key, frontend, 0).is_err() {
        count(prog, |c| c.misses += 1);
    }
}

/// `BPF_NOEXIST`: insert only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

/// Records in the socket's record that it was translated to `chosen` for the frontend
/// `rev_nat_id` (its next sendmsg() sticks to it; its release deletes the rev-NAT
/// entry). Written only when it changes. A backend replaced by another (it left) has its
/// rev-NAT entry deleted. A socket that already has [`SOCK_FRONTENDS`] frontends gets no
/// entry (counted as a miss): its rev-NAT entry is then left to the LRU.
#[inline(always)]
fn remember_socket(cookie: u64, rev_nat_id: u16, chosen: &Chosen, prog: u32) {
    if LB_SOCKS_V1.get_ptr_mut(cookie).is_none() {
        let _ = LB_SOCKS_V1.insert(cookie, SockRecord::zeroed(), BPF_NOEXIST);
    }
    let Some(record) = LB_SOCKS_V1.get_ptr_mut(cookie) else {
        count(prog, |c| c.misses += 1);
        return;
    };
    // SAFETY: a map value, valid for the program's run. Two threads sending on one
    // socket at once may each write an entry; the last wins, and at worst a rev-NAT
    // entry is left to the LRU.
    let record = unsafe { &mut *record };
    let new = SockFrontend {
        addr: chosen.backend.addr,
        port: chosen.backend.port,
        rev_nat_id,
        backend_id: chosen.id,
        slot: chosen.slot,
        _pad: [0; 2],
    };
    let mut free = SOCK_FRONTENDS;
    let mut i = 0;
    while i < SOCK_FRONTENDS {
        let old = record.frontends[i];
        if old.rev_nat_id == rev_nat_id {
            if old.backend_id == chosen.id && (old.slot == chosen.slot || chosen.slot == 0) {
                return;
            }
            // Its rev-NAT entry, unless another frontend of the socket reaches the same
            // pod address and port (the entry is keyed by socket and backend).
            if (old.addr != new.addr || old.port != new.port) && !shared(record, i, &old) {
                forget_frontend(cookie, &old);
            }
            record.frontends[i] = new;
            return;
        }
        if old.rev_nat_id == 0 && free == SOCK_FRONTENDS {
            free = i;
        }
        i += 1;
    }
    if free < SOCK_FRONTENDS {
        record.frontends[free] = new;
    } else {
        count(prog, |c| c.misses += 1);
    }
}

/// Whether an entry of `record` other than the `i`th uses `f`'s backend address and port.
#[inline(always)]
fn shared(record: &SockRecord, i: usize, f: &SockFrontend) -> bool {
    let mut j = 0;
    while j < SOCK_FRONTENDS {
        let o = &record.frontends[j];
        if j != i && o.rev_nat_id != 0 && o.addr == f.addr && o.port == f.port {
            return true;
        }
        j += 1;
    }
    false
}

/// Deletes the socket rev-NAT entry of one of a socket's frontends.
#[inline(always)]
fn forget_frontend(cookie: u64, f: &SockFrontend) {
    let _ = LB_SOCK_REVNAT_V2.remove(SockRevNatKey {
        cookie,
        addr: f.addr,
        port: f.port,
        _pad: [0; 6],
    });
}

/// A socket in the cgroup is released (its last descriptor closed): its record and the
/// socket rev-NAT entries it lists go, so the LRU holds only live sockets' entries.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context is a cgroup sock context, for which the helper is allowed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(record) = unsafe { LB_SOCKS_V1.get(cookie) }.copied() {
        let mut i = 0;
        while i < SOCK_FRONTENDS {
            if record.frontends[i].rev_nat_id != 0 {
                forget_frontend(cookie, &record.frontends[i]);
            }
            i += 1;
        }
        let _ = LB_SOCKS_V1.remove(cookie);
    }
    ALLOW
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
