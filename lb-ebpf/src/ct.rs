//! Connection tracking for the packet level. Every translated flow has two entries in
//! `LB_CT_V1`, one per direction, each mapping a packet's tuple to the tuple it is
//! rewritten to, and each naming the other (its tuple is the other's key reversed).
//!
//! No entry of one flow ever overwrites another flow's: a new flow's entries are created
//! with `BPF_NOEXIST` (reply half first, rolled back if the other fails); a tuple held
//! by a flow that ended, or by a half whose other half now belongs to another flow, is
//! taken only after that flow's entries are removed. A half missing after an LRU
//! eviction is rebuilt from the other, with `BPF_NOEXIST`; a half whose other half's
//! tuple is held by an entry that does not name it back is removed, never used (its
//! flow lost that tuple to another flow: using it would cross the two).

// Keys and values go to the map helpers by reference, not by copy: the eBPF stack is
// 512 bytes for the whole call chain.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "copies would cost eBPF stack"
)]

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    CT_EV_ORPHAN_REMOVED, CT_EV_PORT_RECLAIMED, CT_EV_REBUILD_FAILED, CT_EV_REBUILT,
    CT_EV_SYN_EVICTED, CT_F_CLOSING, CT_F_FIN_ORIG, CT_F_FIN_REPLY, CT_F_REJECT, CT_F_SNAT,
    CT_F_SYN_SENT, CtKey, CtValue, DROP_CT_REFUSED, DROP_CT_TUPLE_TAKEN, DROP_NO_SNAT_PORT,
    SNAT_PORT_MAX, SNAT_PORT_MIN, TCP_ACK, TCP_SYN,
};

/// errno's EEXIST: the key is there (an insert with `BPF_NOEXIST`).
const EEXIST: i32 = 17;

use crate::{
    maps::{CtScratch, LB_CT_SCRATCH, LB_CT_V1, ct_event},
    nat::Packet,
};

/// How often a live entry's `last_seen_ns` is written back (and its partner refreshed).
const REFRESH_NS: u64 = 1_000_000_000;
/// SNAT ports tried for a new flow before giving up. At 4,000 new flows a second to 10
/// backends, the 10 s hold after a close keeps ~30% of each backend's ports taken: 8
/// tries then failed one flow in ~15,000 (measured); 32 fail one in ~10^17.
const SNAT_TRIES: u32 = 32;
/// The top bit of a SNAT port's eviction rank: an unestablished flow holds it.
const UNESTABLISHED_RANK: u64 = 1 << 63;
const NOEXIST: u64 = BPF_NOEXIST as u64;

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

/// Whether TCP flags `tcp` are a bare SYN (a connection's first packet).
#[inline(always)]
pub(crate) fn bare_syn(tcp: u8) -> bool {
    tcp & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn scratch() -> Option<&'static mut CtScratch> {
    let ptr = LB_CT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else runs on this CPU meanwhile.
    Some(unsafe { &mut *ptr })
}

/// The live entry of `key` at `now`, copied to `out`; `false` when there is none, it is
/// stale, or it lost its other half to another flow (the packet starts a new flow). A
/// TCP packet updates the flow's state ([`CtValue::flags_after`]). The entry and its
/// partner are written back when the state changes and at most once a second besides;
/// in between, a missing partner is rebuilt. Not inlined: its stack frame is its own.
#[inline(never)]
pub(crate) fn lookup(key: &CtKey, now: u64, tcp_flags: u8, out: &mut CtValue) -> bool {
    live(key, now, tcp_flags, out).is_some()
}

#[inline(always)]
fn live(key: &CtKey, now: u64, tcp_flags: u8, v: &mut CtValue) -> Option<()> {
    let ptr = LB_CT_V1.get_ptr_mut(key)?;
    // SAFETY: a value of the map, updated in place; another CPU may write the same
    // entry's `last_seen_ns` or `flags` at once, which only costs a refresh.
    let entry = unsafe { &mut *ptr };
    // Stale, or a new connection (a bare SYN) on the tuple of one that is closing or
    // half-closed: a new flow.
    let ending = CT_F_CLOSING | CT_F_FIN_ORIG | CT_F_FIN_REPLY;
    if entry.expired(key.proto, now) || bare_syn(tcp_flags) && entry.flags & ending != 0 {
        return None;
    }
    let flags = CtValue::flags_after(entry.flags, key.proto, tcp_flags);
    let refresh = flags != entry.flags || now.saturating_sub(entry.last_seen_ns) > REFRESH_NS;
    if refresh {
        entry.flags = flags;
        entry.last_seen_ns = now;
    }
    *v = *entry;
    let s = scratch()?;
    v.write_partner(key, &mut s.key, &mut s.value);
    match LB_CT_V1.get_ptr_mut(&s.key) {
        Some(p) => {
            // SAFETY: a value of the map, as above.
            let partner = unsafe { &mut *p };
            if !partner.names(key) {
                // Its tuple belongs to another flow now: this half is dead.
                let _ = LB_CT_V1.remove(key);
                ct_event(CT_EV_ORPHAN_REMOVED);
                return None;
            }
            if refresh {
                partner.flags = CtValue::merged_for_partner(v.flags, partner.flags);
                partner.last_seen_ns = now;
            }
        }
        None => {
            let ev = match LB_CT_V1.insert(&s.key, &s.value, NOEXIST) {
                Ok(()) => CT_EV_REBUILT,
                Err(_) => CT_EV_REBUILD_FAILED,
            };
            ct_event(ev);
        }
    }
    Some(())
}

/// Removes the entry `other_key` if it names `key` (it is the other half of `key`'s
/// flow).
#[inline(always)]
fn remove_if_names(other_key: &CtKey, key: &CtKey) {
    // SAFETY: read in place.
    if unsafe { LB_CT_V1.get(other_key) }.is_some_and(|o| o.names(key)) {
        let _ = LB_CT_V1.remove(other_key);
    }
}

/// What holds a tuple that a new flow wants.
enum Held {
    /// The kernel refused the insert for another reason.
    Refused,
    /// A live flow; `syn_seen_ns` is when it was last seen if it is unestablished (a
    /// candidate for eviction under pressure), else 0.
    Live { syn_seen_ns: u64 },
    /// A TCP flow that closed less than `CT_TCP_TIME_WAIT_S` ago, last seen at
    /// `seen_ns`: its backend may still hold the tuple in TIME_WAIT (told only when
    /// `claim` is asked to).
    TimeWait { seen_ns: u64 },
}

/// Inserts the half `s.key` -> `s.value` of a new flow with `BPF_NOEXIST`. A tuple
/// held by a flow that ended, or by a half whose other half now names another flow, is
/// taken: that flow's entries are removed first; with `time_wait`, not if that flow
/// closed within the backend's TIME_WAIT. Uses the scratch's `other_*`.
#[inline(always)]
fn claim(now: u64, s: &mut CtScratch, time_wait: bool) -> Result<(), Held> {
    let CtScratch {
        key,
        value,
        other_key,
        other_value,
        ..
    } = s;
    match LB_CT_V1.insert(&*key, &*value, NOEXIST) {
        Ok(()) => return Ok(()),
        Err(e) if e == -EEXIST => {}
        Err(_) => return Err(Held::Refused),
    }
    // SAFETY: read in place; a concurrent update only makes the answer stale.
    let Some(holder) = (unsafe { LB_CT_V1.get(&*key) }) else {
        // Gone meanwhile: the tuple is free again.
        return LB_CT_V1
            .insert(&*key, &*value, NOEXIST)
            .map_err(|_| Held::Live { syn_seen_ns: 0 });
    };
    holder.write_partner(key, other_key, other_value);
    // SAFETY: read in place; a concurrent update only makes the answer stale.
    let holder_partner = unsafe { LB_CT_V1.get(&*other_key) };
    let orphan = holder_partner.is_some_and(|p| !p.names(key));
    // A refused flow's entry only translates the refusal: any new flow may take its tuple
    // (the same client port refused at one frontend, then sent to another).
    let refusal = holder.flags & CT_F_REJECT != 0;
    if !holder.expired(key.proto, now) && !orphan && !refusal {
        let syn_seen_ns = if holder.flags & CT_F_SYN_SENT != 0 {
            holder.last_seen_ns.max(1)
        } else {
            0
        };
        return Err(Held::Live { syn_seen_ns });
    }
    if time_wait && !refusal && holder.in_time_wait(key.proto, now) {
        return Err(Held::TimeWait {
            seen_ns: holder.last_seen_ns,
        });
    }
    if !orphan && holder_partner.is_some() {
        let _ = LB_CT_V1.remove(&*other_key);
    }
    let _ = LB_CT_V1.remove(&*key);
    ct_event(CT_EV_PORT_RECLAIMED);
    LB_CT_V1
        .insert(&*key, &*value, NOEXIST)
        .map_err(|_| Held::Live { syn_seen_ns: 0 })
}

/// Removes the flow whose half holds `s.key` (an unestablished one: its port is needed)
/// and inserts `s.key` -> `s.value` in its place. Uses the scratch's `other_*`.
#[inline(always)]
fn evict(s: &mut CtScratch) -> bool {
    let CtScratch {
        key,
        value,
        other_key,
        other_value,
        ..
    } = s;
    // SAFETY: read in place; a concurrent update only makes the answer stale.
    let Some(holder) = (unsafe { LB_CT_V1.get(&*key) }) else {
        return LB_CT_V1.insert(&*key, &*value, NOEXIST).is_ok();
    };
    if holder.flags & CT_F_SYN_SENT == 0 {
        // Established meanwhile: not a victim any more.
        return false;
    }
    holder.write_partner(key, other_key, other_value);
    remove_if_names(other_key, key);
    let _ = LB_CT_V1.remove(&*key);
    ct_event(CT_EV_SYN_EVICTED);
    LB_CT_V1.insert(&*key, &*value, NOEXIST).is_ok()
}

/// Records a new flow `key` -> `value` (its first packet's TCP flags already in
/// `value.flags`), reply half first. A SNAT flow's source port is chosen from the SNAT
/// range so that its reply tuple is new (`random` picks where to start). Returns 0, or
/// the `DROP_*` reason it failed for (no free port; the reply tuple held by another
/// live flow; the map refused an entry); `value` holds what was recorded. Not inlined:
/// its stack frame is its own.
#[inline(never)]
pub(crate) fn create(key: &CtKey, value: &mut CtValue, random: u32) -> u32 {
    let Some(s) = scratch() else {
        return DROP_CT_REFUSED;
    };
    // What is left of an earlier flow on this tuple (stale, closing, re-chosen, or an
    // orphan) goes first, its other half too, so that tuple (a SNAT port) is free at once.
    // SAFETY: read in place; a concurrent update only makes the answer stale.
    if let Some(old) = unsafe { LB_CT_V1.get(key) } {
        old.write_partner(key, &mut s.key, &mut s.value);
        remove_if_names(&s.key, key);
        let _ = LB_CT_V1.remove(key);
    }
    let reason = match record(key, value, random, s) {
        Ok(()) => match LB_CT_V1.insert(key, &*value, NOEXIST) {
            Ok(()) => return 0,
            Err(e) if e == -EEXIST => {
                // Another CPU recorded this flow meanwhile (its first packets on two
                // CPUs at once): its entry wins, ours goes, the packet follows it.
                let _ = LB_CT_V1.remove(&s.key);
                // SAFETY: read in place, copied to the caller's scratch.
                return match unsafe { LB_CT_V1.get(key) } {
                    Some(winner) => {
                        *value = *winner;
                        0
                    }
                    None => DROP_CT_REFUSED,
                };
            }
            Err(_) => DROP_CT_REFUSED,
        },
        Err(reason) => return reason,
    };
    // The original half failed: the reply half goes too.
    let _ = LB_CT_V1.remove(&s.key);
    reason
}

/// The reply half of the new flow `key` -> `value`, inserted (its key left in `s.key`).
#[inline(always)]
fn record(key: &CtKey, value: &mut CtValue, random: u32, s: &mut CtScratch) -> Result<(), u32> {
    let now = value.last_seen_ns;
    if value.flags & CT_F_SNAT == 0 {
        value.write_partner(key, &mut s.key, &mut s.value);
        return claim(now, s, false).map_err(|held| match held {
            Held::Refused => DROP_CT_REFUSED,
            Held::Live { .. } | Held::TimeWait { .. } => DROP_CT_TUPLE_TAKEN,
        });
    }
    // The range without its last port, REJECT_PORT.
    let range = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN);
    // Under pressure, the port to take: the one whose flow closed longest ago among those
    // tried (its backend may still hold the tuple in TIME_WAIT, which costs the new flow
    // at most a SYN retransmission), else the oldest unestablished flow's (evicting a
    // connection being set up costs that connection). One rank, lowest first: when it
    // was last seen, with the top bit set for an unestablished flow. Both are kept in
    // the scratch, and the tries step from one offset: this frame is at the limit of
    // the call chain's stack on 6.1's verifier (512 bytes, each frame rounded up to 32).
    (s.victim_port, s.victim_rank) = (0, u64::MAX);
    let mut offset = random % range;
    for _ in 0..SNAT_TRIES {
        value.sport = SNAT_PORT_MIN + offset as u16;
        offset = (offset + 7919) % range;
        value.write_partner(key, &mut s.key, &mut s.value);
        let rank = match claim(now, s, true) {
            Ok(()) => return Ok(()),
            Err(Held::Refused) => return Err(DROP_CT_REFUSED),
            Err(Held::Live { syn_seen_ns: 0 }) => continue,
            Err(Held::Live { syn_seen_ns }) => syn_seen_ns | UNESTABLISHED_RANK,
            Err(Held::TimeWait { seen_ns }) => seen_ns & !UNESTABLISHED_RANK,
        };
        if rank < s.victim_rank {
            (s.victim_port, s.victim_rank) = (value.sport, rank);
        }
    }
    if s.victim_port == 0 {
        return Err(DROP_NO_SNAT_PORT);
    }
    value.sport = s.victim_port;
    value.write_partner(key, &mut s.key, &mut s.value);
    if s.victim_rank & UNESTABLISHED_RANK != 0 {
        return if evict(s) {
            Ok(())
        } else {
            Err(DROP_NO_SNAT_PORT)
        };
    }
    match claim(now, s, false) {
        Ok(()) => Ok(()),
        Err(Held::Refused) => Err(DROP_CT_REFUSED),
        // Taken meanwhile by a new flow on another CPU.
        Err(_) => Err(DROP_NO_SNAT_PORT),
    }
}
