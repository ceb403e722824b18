//! The packet level, written once for every hook that sees whole frames ([`Ctx`]: tc
//! and XDP): packet-level translation for clients outside the node (NodePort,
//! externalIPs, LoadBalancer IPs; a ClusterIP routed to the node too). The hooks' entry
//! points ([`crate::tc`], [`crate::xdp`]) call [`ingress`] and [`egress`].
//!
//! Ingress: a packet of a tracked flow is rewritten as its entry says (the client's
//! packets to the backend, and replies of backends on other nodes back to the client);
//! a packet to a frontend starts a flow: a backend is chosen as the socket level chooses
//! (the local scope first, for `externalTrafficPolicy: Local`), the flow is recorded in
//! both directions, and the packet is DNATed, SNATed to the node as well when the backend
//! is on another node, and sent on by a FIB lookup. Egress (tc only): replies of this
//! node's backends get the frontend back as their source.

use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    BACKEND_F_LOCAL, CT_EV_FRAG_TRANSLATED, CT_F_CLOSING, CT_F_REJECT, CT_F_REPLY, CT_F_SNAT,
    CtKey, CtValue, DROP_NO_BACKEND, DROP_NO_LOCAL_ENDPOINT, DROP_NO_NODE_ADDR, DROP_NO_ROUTE,
    DROP_REWRITE, DROP_SNAT_LOCAL, DROP_SNAT_TOO_BIG, DROP_SOURCE_RANGE, DROP_TTL_EXCEEDED,
    FrontendPort, PROG_TC_EGRESS, PROTO_UDP, REJECT_PORT, SCOPE_LOCAL, SNAT_PORT_MAX,
    SNAT_PORT_MIN, SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRange, SrcAffinityKey,
};

use crate::{
    ct,
    ctx::Ctx,
    lb,
    maps::{
        LB_FRONTEND_PORTS_V1, LB_IFACES_V3, LB_PKT_SCRATCH, LB_SOURCE_RANGES_V1, PktScratch, count,
        ct_event, dropped,
    },
    nat::{self, IcmpError, Outer, Packet},
};

/// A packet arrived from outside the node: translated if it is a tracked flow's or
/// addressed to a frontend; an ICMP error about a translated packet goes to whoever
/// sent that packet. Returns the hook's verdict.
#[inline(always)]
pub(crate) fn ingress<C: Ctx>(ctx: &C) -> i32 {
    let Some(s) = scratch() else {
        return C::NEXT;
    };
    match Packet::parse_into(ctx, &mut s.packet) {
        Some(()) => translate(ctx, s),
        None => icmp_error(ctx, s),
    }
}

/// This CPU's scratch area for the packet and its flow.
#[inline(always)]
fn scratch() -> Option<&'static mut PktScratch> {
    let ptr = LB_PKT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; one program run at a time uses it.
    Some(unsafe { &mut *ptr })
}

/// A TCP or UDP packet from outside: a tracked flow's, or a new flow's if it is
/// addressed to a frontend. Not inlined: its stack frame is its own.
#[inline(never)]
fn translate<C: Ctx>(ctx: &C, s: &mut PktScratch) -> i32 {
    let ifindex = ctx.ifindex();
    if !maybe_ours(&s.packet, &mut s.port, ifindex) {
        return C::NEXT;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    ct::write_key(&s.packet, &mut s.key);
    let tracked = ct::lookup(&s.key, now, s.packet.tcp_flags, &mut s.value);
    // A reply of this node's own backend is egress's business.
    if tracked && s.value.flags & CT_F_REPLY != 0 && s.value.flags & CT_F_SNAT == 0 {
        return C::NEXT;
    }
    if s.packet.frag == nat::FRAG_LATER {
        // A later fragment follows its datagram's flow; it never starts one.
        if !tracked {
            return C::NEXT;
        }
        ct_event(CT_EV_FRAG_TRANSLATED);
    } else if !tracked || rechoose(&s.key, &s.value, s.packet.tcp_flags) {
        let verdict = new_flow(ctx, s, ifindex, now);
        if verdict != FLOW_RECORDED {
            return verdict;
        }
    }
    s.packet.remember_ports();
    if s.packet.rewrite(ctx, &s.value).is_none() {
        count(C::PROG_IN, |c| c.misses += 1);
        dropped(DROP_REWRITE);
        return C::DROP;
    }
    count(C::PROG_IN, |c| c.translated += 1);
    if s.value.flags & CT_F_SNAT == 0 {
        // A flow to a backend on this node (a pod, or the node itself), or one sent to
        // be refused: handed to the node's stack, translated. Its netfilter then sees
        // client -> backend as one connection whose replies are ESTABLISHED (no CNI
        // masquerade, no INVALID drop), its FORWARD rules (NetworkPolicy engines) apply,
        // and its forwarding decrements the TTL and answers a packet too big for the
        // pod's link with fragmentation-needed (which egress makes about the frontend).
        return C::PASS;
    }
    // A SNATed packet (to a backend on another node, or a reply of one going back to
    // the client) has the node's own address on one side: the stack's forwarding would
    // drop it as a martian. It is sent on from here, as a router would: one hop less.
    if !nat::hop(ctx, s.packet.v6) {
        return ttl_exceeded(ctx, s, ifindex);
    }
    let mut mtu = 0u16;
    match nat::forward(ctx, ifindex, s.packet.family(), &mut mtu) {
        nat::TOO_BIG => too_big_snat(ctx, s, mtu, ifindex),
        nat::LOCAL => {
            count(C::PROG_IN, |c| c.misses += 1);
            dropped(DROP_SNAT_LOCAL);
            C::DROP
        }
        nat::HAND_ON => hand_on(ctx, s),
        verdict => forwarded::<C>(verdict),
    }
}

/// Whether packet `p`, arrived on `ifindex`, may be ours: some frontend has its
/// destination address, port and protocol (one lookup, the key built in the scratch's
/// `port`), or it is a SNATed flow's reply (to the node's own address there, at a port
/// of the SNAT range). Everything else (traffic to pods, to the node's own services, to
/// other addresses) is passed on after this check, before any connection tracking.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "a copy would cost eBPF stack"
)]
fn maybe_ours(p: &Packet, key: &mut FrontendPort, ifindex: u32) -> bool {
    key.addr = p.daddr;
    key.port = u16::from_be(p.dport);
    key.proto = p.proto;
    key._pad = 0;
    // SAFETY: only tested for presence.
    if unsafe { LB_FRONTEND_PORTS_V1.get(&*key) }.is_some() {
        return true;
    }
    if !(SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&key.port) {
        return false;
    }
    // SAFETY: read in place.
    unsafe { LB_IFACES_V3.get(ifindex) }.is_some_and(|i| i.addr4 == p.daddr || i.addr6 == p.daddr)
}

/// A SNATed packet too big for the way to its backend: restored to what the client
/// sent and answered with fragmentation-needed about it (IPv4 with DF set); otherwise
/// dropped and counted. Not inlined: its stack frame is its own.
#[inline(never)]
fn too_big_snat<C: Ctx>(ctx: &C, s: &mut PktScratch, mtu: u16, ifindex: u32) -> i32 {
    let answered = if !s.packet.v6 && nat::dont_fragment(ctx) {
        nat::swap_tuple(&mut s.packet, &mut s.value);
        s.packet
            .rewrite(ctx, &s.value)
            .and_then(|()| nat::icmp_reply(ctx, s, nat::frag_needed_msg(mtu), ifindex))
    } else {
        None
    };
    answered.unwrap_or_else(|| {
        count(C::PROG_IN, |c| c.misses += 1);
        dropped(DROP_SNAT_TOO_BIG);
        C::DROP
    })
}

/// A SNATed packet that arrived with a TTL (hop limit) of 1: a client's IPv4 packet is
/// restored to what the client sent and answered with time exceeded, as a router on
/// the way answers (traceroute sees the node); otherwise dropped and counted. Not
/// inlined: its stack frame is its own.
#[inline(never)]
fn ttl_exceeded<C: Ctx>(ctx: &C, s: &mut PktScratch, ifindex: u32) -> i32 {
    // Only about a first fragment (or a whole packet), as routers answer.
    let answer =
        !s.packet.v6 && s.value.flags & CT_F_REPLY == 0 && s.packet.frag != nat::FRAG_LATER;
    let answered = if answer {
        nat::swap_tuple(&mut s.packet, &mut s.value);
        s.packet
            .rewrite(ctx, &s.value)
            .and_then(|()| nat::icmp_reply(ctx, s, nat::TIME_EXCEEDED_MSG, ifindex))
    } else {
        None
    };
    answered.unwrap_or_else(|| {
        dropped(DROP_TTL_EXCEEDED);
        C::DROP
    })
}

/// A translated packet that XDP does not send ([`nat::HAND_ON`]: its next hop's
/// link-layer address is not known, or it leaves by another interface): restored to
/// what arrived (the tuple and the hop taken off) and handed on to tc, which finds the
/// flow and sends it. Not inlined: its stack frame is its own.
#[inline(never)]
fn hand_on<C: Ctx>(ctx: &C, s: &mut PktScratch) -> i32 {
    nat::swap_tuple(&mut s.packet, &mut s.value);
    if s.packet.rewrite(ctx, &s.value).is_none() || !nat::unhop(ctx, s.packet.v6) {
        count(C::PROG_IN, |c| c.misses += 1);
        dropped(DROP_REWRITE);
        return C::DROP;
    }
    C::NEXT
}

/// `verdict` of [`nat::forward`], a drop counted.
#[inline(always)]
fn forwarded<C: Ctx>(verdict: i32) -> i32 {
    if verdict == C::DROP {
        dropped(DROP_NO_ROUTE);
    }
    verdict
}

/// Whether a tracked flow's packet starts it over: a UDP datagram, as kube-proxy clears
/// UDP conntrack entries, when its backend left every service or it was refused and its
/// frontend has backends now; a new TCP connection (a bare SYN on the tuple) when its
/// backend left. (A TCP connection keeps its backend until it ends.)
#[inline(always)]
fn rechoose(key: &CtKey, v: &CtValue, tcp_flags: u8) -> bool {
    if v.flags & CT_F_REPLY != 0 {
        return false;
    }
    if key.proto != PROTO_UDP {
        return ct::bare_syn(tcp_flags) && !lb::backend_exists(v.backend_id);
    }
    if v.flags & CT_F_REJECT != 0 {
        let external = ServiceKey::new(key.daddr, key.dport, key.proto, 0);
        return lb::header(external).is_some_and(|h| h.count > 0);
    }
    !lb::backend_exists(v.backend_id)
}

/// An ICMP error whose quoted packet belongs to a tracked flow: parsed (the quoted tuple
/// in `s.packet`), with the entry that the quoted packet's reverse hits in `s.value`.
#[inline(always)]
fn tracked_icmp_error<C: Ctx>(ctx: &C, s: &mut PktScratch) -> Option<IcmpError> {
    let err = IcmpError::parse(ctx, &mut s.packet)?;
    ct::write_reply_key(&s.packet, &mut s.key);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    ct::lookup(&s.key, now, 0, &mut s.value).then_some(err)
}

/// An ICMP error about a translated packet, made about the packet as its sender sent it
/// and sent to that sender, so path-MTU discovery and unreachable errors work through
/// the NAT: one about a packet the node SNATed towards a backend on another node (from
/// a router on that way, to the node's SNAT address) goes to the client; one about a
/// reply the node sent to a client (from a router on the client's way, to the
/// frontend) goes to the backend. Anything else is not ours.
#[inline(never)]
fn icmp_error<C: Ctx>(ctx: &C, s: &mut PktScratch) -> i32 {
    let Some(err) = tracked_icmp_error(ctx, s) else {
        return C::NEXT;
    };
    let v = &s.value;
    let snat_reply = v.flags & CT_F_REPLY != 0 && v.flags & CT_F_SNAT != 0;
    let client_flow = v.flags & (CT_F_REPLY | CT_F_REJECT) == 0;
    if !snat_reply && !client_flow {
        return C::NEXT;
    }
    if !C::HAS_NEIGH && !(client_flow && v.flags & CT_F_SNAT == 0) {
        // It leaves the node again. Errors are few: tc sends them, which can have the
        // kernel resolve a next hop (XDP would have to drop those).
        return C::NEXT;
    }
    // The entry the quoted packet's reverse hits maps it to what its sender sent:
    // backend -> node:port becomes frontend -> client (the message goes to the client);
    // client -> frontend becomes backend -> client or node:port (it goes to the backend).
    if err.rewrite(ctx, &s.packet, v, Outer::ToSender).is_none() {
        count(C::PROG_IN, |c| c.misses += 1);
        dropped(DROP_REWRITE);
        return C::DROP;
    }
    count(C::PROG_IN, |c| c.translated += 1);
    if client_flow && v.flags & CT_F_SNAT == 0 {
        // About a reply of a backend on this node: to the stack, whose conntrack
        // relates it to the flow, as it does for the flow's own packets.
        return C::PASS;
    }
    let mut mtu = 0u16;
    match nat::forward(ctx, ctx.ifindex(), s.packet.family(), &mut mtu) {
        nat::TOO_BIG | nat::LOCAL | nat::HAND_ON => {
            dropped(DROP_NO_ROUTE);
            C::DROP
        }
        verdict => forwarded::<C>(verdict),
    }
}

/// The node stack's ICMP errors about a flow it handles without SNAT: port unreachable
/// for a flow sent to be refused (a frontend without backends), fragmentation-needed
/// for a packet too big for the way to a backend on this node. Made about the client's
/// packet to the frontend, and sent from the frontend's address.
#[inline(never)]
fn refusal<C: Ctx>(ctx: &C, s: &mut PktScratch) -> i32 {
    // The quoted packet is client -> node:REJECT_PORT or client -> backend.
    let Some(err) = tracked_icmp_error(ctx, s) else {
        return C::NEXT;
    };
    let v = &s.value;
    if v.flags & CT_F_REPLY == 0 || v.flags & CT_F_SNAT != 0 {
        return C::NEXT;
    }
    if err
        .rewrite(ctx, &s.packet, v, Outer::FromFrontend)
        .is_some()
    {
        count(PROG_TC_EGRESS, |c| c.translated += 1);
    } else {
        count(PROG_TC_EGRESS, |c| c.misses += 1);
    }
    C::NEXT
}

/// `new_flow`'s and `choose`'s verdict when the flow is in `out` (not a tc verdict).
const FLOW_RECORDED: i32 = i32::MIN;

/// A packet that no flow tracks: a new flow if it is addressed to a frontend, recorded
/// and written to `out` ([`FLOW_RECORDED`]); else the packet's verdict. Not inlined: its
/// stack frame is its own.
#[inline(never)]
fn new_flow<C: Ctx>(ctx: &C, s: &mut PktScratch, ifindex: u32, now: u64) -> i32 {
    let verdict = choose(ctx, s, ifindex, now);
    if verdict != FLOW_RECORDED {
        return verdict;
    }
    s.value.flags = CtValue::flags_new(s.value.flags, s.key.proto, s.packet.tcp_flags);
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    match ct::create(&s.key, &mut s.value, random) {
        0 => FLOW_RECORDED,
        reason => {
            count(C::PROG_IN, |c| c.misses += 1);
            dropped(reason);
            C::DROP
        }
    }
}

/// The backend and the translation for the new flow `s.key`, written to `s.value`
/// ([`FLOW_RECORDED`]); else the packet's verdict.
#[inline(always)]
fn choose<C: Ctx>(ctx: &C, s: &mut PktScratch, ifindex: u32, now: u64) -> i32 {
    if !frontend(&s.key, &mut s.svc, &mut s.header) {
        return C::NEXT;
    }
    let (key, svc, header, out) = (&s.key, &s.svc, &s.header, &mut s.value);
    out.last_seen_ns = now;
    out._pad = [0; 7];
    if header.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(header.rev_nat_id, key) {
        // loadBalancerSourceRanges: not from an allowed range (not even to be refused).
        count(C::PROG_IN, |c| c.refused += 1);
        dropped(DROP_SOURCE_RANGE);
        return C::DROP;
    }
    if header.count == 0 {
        count(C::PROG_IN, |c| c.refused += 1);
        // externalTrafficPolicy Local without a local backend: dropped, as kube-proxy
        // does. Otherwise the packet goes to the node's own stack at a port where
        // nothing listens: it answers as for a closed port (TCP RST; ICMP port
        // unreachable, rate-limited), and egress gives the answer the frontend's address.
        if svc.scope == SCOPE_LOCAL {
            dropped(DROP_NO_LOCAL_ENDPOINT);
            return C::DROP;
        }
        let Some(node) = node_addr(ifindex, key) else {
            dropped(DROP_NO_NODE_ADDR);
            return C::DROP;
        };
        out.saddr = key.saddr;
        out.sport = key.sport;
        out.daddr = node;
        out.dport = REJECT_PORT;
        out.backend_id = 0;
        out.flags = CT_F_REJECT | CT_F_CLOSING;
        return FLOW_RECORDED;
    }
    let Some(chosen) = backend::<C>(key, svc, header, now) else {
        dropped(DROP_NO_BACKEND);
        return C::DROP;
    };
    let snat = chosen.backend.flags & BACKEND_F_LOCAL == 0;
    if snat {
        // The address of the interface the flow leaves by (where the backend's replies
        // come back to), if the programs are on it; else the one it came in by.
        let out_if = nat::route_ifindex(ctx, ifindex, &chosen.backend.addr);
        let Some(addr) = node_addr(out_if, key).or_else(|| node_addr(ifindex, key)) else {
            count(C::PROG_IN, |c| c.misses += 1);
            dropped(DROP_NO_NODE_ADDR);
            return C::DROP;
        };
        out.saddr = addr;
        out.sport = 0;
        out.flags = CT_F_SNAT;
    } else {
        out.saddr = key.saddr;
        out.sport = key.sport;
        out.flags = 0;
    }
    out.daddr = chosen.backend.addr;
    out.dport = chosen.backend.port;
    out.backend_id = chosen.id;
    FLOW_RECORDED
}

/// Whether the client of `key` is in one of the frontend's source ranges.
#[inline(always)]
fn source_allowed(rev_nat_id: u16, key: &CtKey) -> bool {
    let probe = Key::new(
        SourceRange::prefix_len(128),
        SourceRange {
            rev_nat_id_be: rev_nat_id.to_be(),
            _pad: [0; 2],
            addr: key.saddr,
        },
    );
    LB_SOURCE_RANGES_V1.get(&probe).is_some()
}

/// The client's remembered backend (ClientIP affinity, keyed by its source address),
/// else a new choice ([`fresh`]); the choice is remembered when the frontend has
/// affinity.
#[inline(always)]
fn backend<C: Ctx>(
    key: &CtKey,
    svc: &ServiceKey,
    header: &ServiceValue,
    now: u64,
) -> Option<lb::Chosen> {
    if header.affinity_timeout == 0 {
        return fresh::<C>(key, svc, header);
    }
    let akey = SrcAffinityKey {
        addr: key.saddr,
        rev_nat_id: header.rev_nat_id,
        _pad: [0; 6],
    };
    if let Some(c) = lb::remembered_src(&akey, now, header, C::PROG_IN) {
        lb::remember_src(&akey, now, &c, header.epoch, C::PROG_IN);
        return Some(c);
    }
    let chosen = fresh::<C>(key, svc, header)?;
    lb::remember_src(&akey, now, &chosen, header.epoch, C::PROG_IN);
    Some(chosen)
}

/// A new flow's backend: its Maglev table's entry when the frontend has a table
/// (`--lb-algorithm maglev`), else (random mode, or a table the agent is still
/// writing) one at random.
#[inline(always)]
fn fresh<C: Ctx>(key: &CtKey, svc: &ServiceKey, header: &ServiceValue) -> Option<lb::Chosen> {
    if let Some(chosen) = lb::maglev(svc, key) {
        return Some(chosen);
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    lb::pick(*svc, header, random, C::PROG_IN)
}

/// The frontend a packet is addressed to, written to `svc` and `header`: its local scope
/// if it has one, else the external one; `false` when there is none.
#[inline(always)]
fn frontend(key: &CtKey, svc: &mut ServiceKey, header: &mut ServiceValue) -> bool {
    *svc = ServiceKey::new(key.daddr, key.dport, key.proto, 0);
    svc.scope = SCOPE_LOCAL;
    if let Some(h) = lb::header(*svc) {
        *header = h;
        return true;
    }
    svc.scope = lb_common::SCOPE_EXTERNAL;
    match lb::header(*svc) {
        Some(h) => {
            *header = h;
            true
        }
        None => false,
    }
}

/// The node's address of `key`'s family on interface `ifindex`, as the agent
/// configured it.
#[inline(always)]
fn node_addr(ifindex: u32, key: &CtKey) -> Option<lb_common::Addr> {
    // SAFETY: copied out at once.
    let iface = unsafe { LB_IFACES_V3.get(ifindex) }.copied()?;
    let addr = if lb_common::as_v4(&key.daddr).is_some() {
        iface.addr4
    } else {
        iface.addr6
    };
    (addr != [0; 16]).then_some(addr)
}

/// A packet leaving by an external interface that did not come in by it (tc egress):
/// a reply of this node's own backend, or an ICMP error of its stack about a flow it
/// handles, gets the frontend back as its source. Returns the hook's verdict.
#[inline(always)]
pub(crate) fn egress<C: Ctx>(ctx: &C) -> i32 {
    let Some(s) = scratch() else {
        return C::NEXT;
    };
    match Packet::parse_into(ctx, &mut s.packet) {
        Some(()) => reverse(ctx, s),
        None => refusal(ctx, s),
    }
}

/// A reply of this node's own backend (or of its stack refusing a flow): the frontend
/// becomes its source again. Not inlined: its stack frame is its own.
#[inline(never)]
fn reverse<C: Ctx>(ctx: &C, s: &mut PktScratch) -> i32 {
    ct::write_key(&s.packet, &mut s.key);
    let (p, v) = (&mut s.packet, &mut s.value);
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if ct::lookup(&s.key, now, p.tcp_flags, v)
        && v.flags & CT_F_REPLY != 0
        && v.flags & CT_F_SNAT == 0
    {
        p.remember_ports();
        if p.frag == nat::FRAG_LATER {
            ct_event(CT_EV_FRAG_TRANSLATED);
        }
        if p.rewrite(ctx, v).is_some() {
            count(PROG_TC_EGRESS, |c| c.translated += 1);
        } else {
            count(PROG_TC_EGRESS, |c| c.misses += 1);
        }
    }
    C::NEXT
}
