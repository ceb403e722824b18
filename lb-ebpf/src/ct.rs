//! Connection tracking for the packet level. Every translated flow has two entries in
//! `LB_CT_V1`, one per direction, each mapping a packet's tuple to the tuple it is
//! rewritten to. Either half rebuilds the other ([`CtValue::partner`]), so an LRU
//! eviction of one half is repaired by the next packet of the flow, never half-translated.

// Keys and values go to the map helpers by reference, not by copy: the eBPF stack is
// 512 bytes for the whole call chain.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "copies would cost eBPF stack"
)]

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    CT_F_CLOSING, CT_F_SNAT, CtKey, CtValue, DROP_CT_REFUSED, DROP_NO_SNAT_PORT, SNAT_PORT_MAX,
    SNAT_PORT_MIN,
};

/// errno's EEXIST: the key is there (an insert with `BPF_NOEXIST`).
const EEXIST: i32 = 17;

use crate::{
    maps::{LB_CT_SCRATCH, LB_CT_V1},
    nat::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// How often a live entry's `last_seen_ns` is written back (and its partner refreshed).
const REFRESH_NS: u64 = 1_000_000_000;
/// SNAT ports tried for a new flow before giving up. At 4,000 new flows a second to 10
/// backends, the 10 s hold after a close keeps ~30% of each backend's ports taken: 8
/// tries then failed one flow in ~15,000 (measured); 32 fail one in ~10^17.
const SNAT_TRIES: u32 = 32;

/// The tracking key of a packet: its tuple as it arrived, written to `key`.
#[inline(always)]
pub(crate) fn write_key(p: &Packet, key: &mut CtKey) {
    key.saddr = p.saddr;
    key.daddr = p.daddr;
    key.sport = u16::from_be(p.sport);
    key.dport = u16::from_be(p.dport);
    key.proto = p.proto;
    key._pad = [0; 3];
}

/// The key of the reply to packet `p` (its tuple reversed), written to `key`: what an
/// ICMP error's quoted packet is looked up by.
#[inline(always)]
pub(crate) fn write_reply_key(p: &Packet, key: &mut CtKey) {
    key.saddr = p.daddr;
    key.daddr = p.saddr;
    key.sport = u16::from_be(p.dport);
    key.dport = u16::from_be(p.sport);
    key.proto = p.proto;
    key._pad = [0; 3];
}

/// The live entry of `key` at `now`, copied to `out`; `false` when there is none or it
/// is stale (the packet starts a new flow). A TCP FIN or RST marks the flow closing. The
/// entry and its partner are written back at most once a second; in between, a missing
/// partner is rebuilt. Not inlined: its stack frame is its own.
#[inline(never)]
pub(crate) fn lookup(key: &CtKey, now: u64, tcp_flags: u8, out: &mut CtValue) -> bool {
    match live(key, now, tcp_flags) {
        Some(v) => {
            *out = v;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn live(key: &CtKey, now: u64, tcp_flags: u8) -> Option<CtValue> {
    let ptr = LB_CT_V1.get_ptr_mut(key)?;
    // SAFETY: a value of the map, updated in place; another CPU may write the same
    // entry's `last_seen_ns` or `flags` at once, which only costs a refresh.
    let entry = unsafe { &mut *ptr };
    // Stale, or a new connection (a bare SYN) on the tuple of a closing one: a new flow.
    let new_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && entry.flags & CT_F_CLOSING != 0;
    if entry.expired(key.proto, now) || new_syn {
        return None;
    }
    let closing = tcp_flags & (TCP_FIN | TCP_RST) != 0 && entry.flags & CT_F_CLOSING == 0;
    let refresh = closing || now.saturating_sub(entry.last_seen_ns) > REFRESH_NS;
    if closing {
        entry.flags |= CT_F_CLOSING;
    }
    if refresh {
        entry.last_seen_ns = now;
    }
    let v = *entry;
    let scratch = LB_CT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on this CPU meanwhile.
    let partner = unsafe { &mut *scratch };
    v.write_partner(key, &mut partner.key, &mut partner.value);
    // SAFETY: only tested for presence.
    if refresh || unsafe { LB_CT_V1.get(&partner.key) }.is_none() {
        let _ = LB_CT_V1.insert(&partner.key, &partner.value, 0);
    }
    Some(v)
}

/// Takes the SNAT port of `reply_key` for `reply` if the entry holding it there is
/// stale at `now` (a flow that ended: the LRU only evicts when the map is full).
#[inline(always)]
fn reclaim(reply_key: &CtKey, reply: &CtValue, now: u64) -> bool {
    // SAFETY: copied out at once.
    let stale =
        unsafe { LB_CT_V1.get(reply_key) }.is_some_and(|old| old.expired(reply_key.proto, now));
    stale && LB_CT_V1.insert(reply_key, reply, 0).is_ok()
}

/// Records a new flow `key` -> `value`, reply half first. A SNAT flow's source port is
/// chosen from the SNAT range so that its reply tuple is new (`random` picks where to
/// start). Returns 0, or the `DROP_*` reason it failed for (no free port; the map
/// refused an entry); `value` holds what was recorded. Not inlined: its stack frame is
/// its own.
#[inline(never)]
pub(crate) fn create(key: &CtKey, value: &mut CtValue, random: u32) -> u32 {
    match record(key, value, random) {
        Ok(()) => 0,
        Err(reason) => reason,
    }
}

#[inline(always)]
fn record(key: &CtKey, value: &mut CtValue, random: u32) -> Result<(), u32> {
    let scratch = LB_CT_SCRATCH.get_ptr_mut(0).ok_or(DROP_CT_REFUSED)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on this CPU meanwhile.
    let reply = unsafe { &mut *scratch };
    if value.flags & CT_F_SNAT == 0 {
        value.write_partner(key, &mut reply.key, &mut reply.value);
        LB_CT_V1
            .insert(&reply.key, &reply.value, 0)
            .map_err(|_| DROP_CT_REFUSED)?;
        return LB_CT_V1
            .insert(key, &*value, 0)
            .map_err(|_| DROP_CT_REFUSED);
    }
    // The range without its last port, REJECT_PORT.
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN);
    for i in 0..SNAT_TRIES {
        value.sport = SNAT_PORT_MIN + (random.wrapping_add(i.wrapping_mul(7919)) % range) as u16;
        value.write_partner(key, &mut reply.key, &mut reply.value);
        let taken = match LB_CT_V1.insert(&reply.key, &reply.value, u64::from(BPF_NOEXIST)) {
            Ok(()) => false,
            // The port is taken for this backend; a flow that ended leaves it.
            Err(e) if e == -EEXIST => !reclaim(&reply.key, &reply.value, value.last_seen_ns),
            Err(_) => return Err(DROP_CT_REFUSED),
        };
        if !taken {
            return LB_CT_V1
                .insert(key, &*value, 0)
                .map_err(|_| DROP_CT_REFUSED);
        }
    }
    Err(DROP_NO_SNAT_PORT)
}
