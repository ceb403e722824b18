//! Service lookup and backend choice, shared by every hook that translates a destination:
//! the frontend's header (slot 0), a remembered ClientIP-affinity backend if still valid,
//! else a random slot.

use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, ServiceKey, ServiceValue, SrcAffinityKey,
    affinity_valid, flow_hash, maglev_entry, maglev_half, pick_slot,
};

use crate::maps::{
    LB_AFFINITY_SRC_V1, LB_AFFINITY_V1, LB_BACKENDS_V2, LB_MAGLEV_V1, LB_SERVICES_V2, count,
};

/// A chosen backend, its id and the frontend's slot it was found in (0: not known, as
/// for an affinity entry's backend).
#[derive(Clone, Copy)]
pub(crate) struct Chosen {
    pub id: u32,
    pub backend: Backend,
    pub slot: u16,
}

/// Slots [`stuck`] looks through for a socket's backend that is no longer in the slot it
/// was chosen from (the agent moved it into a hole another backend left): bounded, so
/// that the program stays small; a socket whose backend moved beyond them chooses anew.
const STUCK_SCAN: u16 = 16;

/// The header of the frontend `key` (slot 0), if it is one.
#[inline(always)]
pub(crate) fn header(key: ServiceKey) -> Option<ServiceValue> {
    // SAFETY: values are copied out at once; the agent writes whole values.
    unsafe { LB_SERVICES_V2.get(key) }.copied()
}

/// The affinity entry of a client (`akey`) at time `now`, when the frontend has
/// affinity: the remembered backend if it is still valid and still exists (the agent
/// deletes the entries of backends that leave the service).
#[inline(always)]
pub(crate) fn remembered(
    akey: AffinityKey,
    now: u64,
    header: &ServiceValue,
    prog: u32,
) -> Option<Chosen> {
    // SAFETY: copied out at once.
    let entry = unsafe { LB_AFFINITY_V1.get(akey) }.copied()?;
    still_valid(entry, now, header, prog)
}

/// [`remembered`] for the packet level, whose client is its source address.
#[inline(always)]
pub(crate) fn remembered_src(
    akey: &SrcAffinityKey,
    now: u64,
    header: &ServiceValue,
    prog: u32,
) -> Option<Chosen> {
    // SAFETY: copied out at once.
    let entry = unsafe { LB_AFFINITY_SRC_V1.get(akey) }.copied()?;
    still_valid(entry, now, header, prog)
}

/// The backend of an affinity entry, if the entry is of the frontend's generation,
/// within the timeout, and the backend still exists.
#[inline(always)]
fn still_valid(entry: AffinityValue, now: u64, header: &ServiceValue, prog: u32) -> Option<Chosen> {
    if entry.epoch != header.epoch
        || !affinity_valid(entry.last_used_ns, now, header.affinity_timeout)
    {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = unsafe { LB_BACKENDS_V2.get(entry.backend_id) }.copied()?;
    count(prog, |c| c.affinity_hits += 1);
    Some(Chosen {
        id: entry.backend_id,
        backend,
        slot: 0,
    })
}

/// The backend `backend_id` that a socket was translated to before, if it is still one
/// of the frontend's: in its slot `slot`, or (moved) in one of the first
/// [`STUCK_SCAN`] slots. Backend ids are never reused, so an id found is that backend.
#[inline(always)]
pub(crate) fn stuck(
    key: ServiceKey,
    header: &ServiceValue,
    backend_id: u32,
    slot: u16,
) -> Option<Chosen> {
    if slot != 0
        && slot <= header.count
        && let Some(c) = backend_at(key, slot).filter(|c| c.id == backend_id)
    {
        return Some(c);
    }
    let mut s = 1;
    while s <= STUCK_SCAN && s <= header.count {
        // SAFETY: only the id is read.
        if unsafe { LB_SERVICES_V2.get(key.with_slot(s)) }
            .is_some_and(|v| v.backend_id == backend_id)
        {
            return backend_at(key, s);
        }
        s += 1;
    }
    None
}

/// A backend at random among the frontend's `header.count` slots. A slot or backend may
/// vanish between the lookups while the agent shrinks the service; slot 1 exists as long
/// as the service has a backend, so it is tried next. `None` if that fails too (the
/// service is being deleted).
#[inline(always)]
pub(crate) fn pick(
    key: ServiceKey,
    header: &ServiceValue,
    random: u32,
    prog: u32,
) -> Option<Chosen> {
    let slot = pick_slot(header.count, random).unwrap_or(1);
    match backend_at(key, slot) {
        Some(b) => Some(b),
        None => {
            count(prog, |c| c.misses += 1);
            backend_at(key, 1)
        }
    }
}

/// The backend that the Maglev table of frontend `svc` (its header key) names for the
/// flow `key`: the entry at the flow's 5-tuple hash modulo the table's size. `None`
/// when the frontend has no table (random mode, or the agent is writing it) or the
/// entry's backend is gone.
#[inline(always)]
pub(crate) fn maglev(svc: &ServiceKey, key: &CtKey) -> Option<Chosen> {
    let id = maglev_id(svc, key);
    if id == 0 {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = unsafe { LB_BACKENDS_V2.get(id) }.copied()?;
    Some(Chosen {
        id,
        backend,
        slot: 0,
    })
}

/// [`maglev`]'s table lookup: the backend id, 0 for none. Not inlined: its stack frame
/// is its own.
#[inline(never)]
fn maglev_id(svc: &ServiceKey, key: &CtKey) -> u32 {
    // SAFETY: tables are arrays (preallocated, never freed while a program holds one);
    // the elements are copied out at once.
    let Some(&size) = (unsafe { LB_MAGLEV_V1.get_value(svc, &0) }) else {
        return 0;
    };
    let hash = flow_hash(&key.saddr, &key.daddr, key.sport, key.dport, key.proto);
    let Some((element, high)) = maglev_entry(hash, size as u32) else {
        return 0;
    };
    // SAFETY: as above.
    match unsafe { LB_MAGLEV_V1.get_value(svc, &element) } {
        Some(&e) => maglev_half(e, high),
        None => 0,
    }
}

/// Remembers `chosen` as the client's backend, as of `now`.
#[inline(always)]
pub(crate) fn remember(akey: AffinityKey, now: u64, chosen: &Chosen, epoch: u8, prog: u32) {
    if LB_AFFINITY_V1
        .insert(akey, entry(now, chosen, epoch), 0)
        .is_err()
    {
        count(prog, |c| c.misses += 1);
    }
}

/// [`remember`] for the packet level.
#[inline(always)]
pub(crate) fn remember_src(akey: &SrcAffinityKey, now: u64, chosen: &Chosen, epoch: u8, prog: u32) {
    if LB_AFFINITY_SRC_V1
        .insert(akey, entry(now, chosen, epoch), 0)
        .is_err()
    {
        count(prog, |c| c.misses += 1);
    }
}

#[inline(always)]
fn entry(now: u64, chosen: &Chosen, epoch: u8) -> AffinityValue {
    AffinityValue {
        backend_id: chosen.id,
        epoch,
        _pad: [0; 3],
        last_used_ns: now,
    }
}

/// Whether backend `id` is still in the backends map (some frontend uses it).
#[inline(always)]
pub(crate) fn backend_exists(id: u32) -> bool {
    // SAFETY: only tested for presence.
    unsafe { LB_BACKENDS_V2.get(id) }.is_some()
}

/// The backend in one slot of a frontend.
#[inline(always)]
fn backend_at(key: ServiceKey, slot: u16) -> Option<Chosen> {
    // SAFETY: copied out at once (see above).
    let id = unsafe { LB_SERVICES_V2.get(key.with_slot(slot)) }?.backend_id;
    // SAFETY: copied out at once.
    let backend = unsafe { LB_BACKENDS_V2.get(id) }.copied()?;
    Some(Chosen { id, backend, slot })
}
