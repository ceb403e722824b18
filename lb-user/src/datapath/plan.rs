//! The datapath layer: the only code that writes the BPF maps.
//!
//! [`Programmed`] mirrors what the maps hold. [`Programmed::plan`] diffs it against the
//! desired state and returns the map operations, in an order that never lets a concurrent
//! connect() see a half-written service:
//!
//! 1. new backends are written; affinity entries left under the rev-NAT id of a new
//!    affinity frontend (an id used before) are purged;
//! 2. per frontend: its rev-NAT entry, then changed slots, then the header (slot 0) with
//!    the new count, then slots beyond the new count are deleted;
//! 3. affinity entries pointing at backends that left a frontend are purged (the kernel
//!    also ignores entries whose backend is gone, so the purge may come after the slots);
//! 4. frontends that are gone lose their header first, then their slots and rev-NAT entry;
//! 5. backends no frontend uses any more are deleted.
//!
//! Slots are assigned stably: a backend keeps its slot while it stays, so one endpoint
//! change costs a couple of writes, not a rewrite of the service.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    Addr, AffinityKey, AffinityValue, Backend, Counters, MAP_AFFINITY, MAP_BACKENDS, MAP_COUNTERS,
    MAP_REVNAT, MAP_SERVICES, MAX_SLOTS, PROG_NAMES, RevNat, ServiceKey, ServiceValue,
};

use crate::model::{Desired, Endpoint, Frontend, Proto};

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        value: Backend,
    },
    DelBackend {
        id: u32,
    },
    PutService {
        key: ServiceKey,
        value: ServiceValue,
    },
    DelService {
        key: ServiceKey,
    },
    PutRevNat {
        id: u16,
        value: RevNat,
    },
    DelRevNat {
        id: u16,
    },
    /// Deletes the affinity entries of a frontend: all, or those naming one backend.
    PurgeAffinity {
        rev_nat_id: u16,
        backend_id: Option<u32>,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PutBackend { id, value } => write!(
                f,
                "{MAP_BACKENDS}: write backend {id} = {}",
                SocketAddr::new(ip_of(&value.addr), value.port)
            ),
            Self::DelBackend { id } => write!(f, "{MAP_BACKENDS}: delete backend {id}"),
            Self::PutService { key, .. } => write!(
                f,
                "{MAP_SERVICES}: write {} slot {}",
                frontend_of(key).map_or("?".into(), |fe| fe.to_string()),
                key.slot
            ),
            Self::DelService { key } => write!(
                f,
                "{MAP_SERVICES}: delete {} slot {}",
                frontend_of(key).map_or("?".into(), |fe| fe.to_string()),
                key.slot
            ),
            Self::PutRevNat { id, .. } => write!(f, "{MAP_REVNAT}: write rev-NAT {id}"),
            Self::DelRevNat { id } => write!(f, "{MAP_REVNAT}: delete rev-NAT {id}"),
            Self::PurgeAffinity {
                rev_nat_id,
                backend_id: None,
            } => write!(f, "{MAP_AFFINITY}: purge rev-NAT {rev_nat_id}"),
            Self::PurgeAffinity {
                rev_nat_id,
                backend_id: Some(b),
            } => write!(f, "{MAP_AFFINITY}: purge rev-NAT {rev_nat_id} backend {b}"),
        }
    }
}

/// An address as the maps store it (IPv4 mapped into IPv6, see [`lb_common::Addr`]).
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => lb_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a map entry holds, IPv4 when it is a mapped one.
pub fn ip_of(addr: &Addr) -> IpAddr {
    IpAddr::from(*addr).to_canonical()
}

pub fn service_key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(addr_of(fe.addr), fe.port, fe.proto.number(), slot)
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: ip_of(&key.addr),
        port: key.port,
        proto: Proto::from_number(key.proto)?,
    })
}

/// A frontend's header and, per slot, the backend id and the backend entry (if present).
pub type FrontendView = (ServiceValue, Vec<(u32, Option<Backend>)>);

/// The contents of the maps the agent writes, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub revnat: BTreeMap<u16, RevNat>,
    /// Written by the programs; the agent only deletes.
    pub affinity: BTreeMap<AffinityKey, AffinityValue>,
}

impl Snapshot {
    /// Applies one operation (the in-memory twin of [`BpfMaps::apply`]).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutBackend { id, value } => {
                self.backends.insert(id, value);
            }
            Op::DelBackend { id } => {
                self.backends.remove(&id);
            }
            Op::PutService { key, value } => {
                self.services.insert(key, value);
            }
            Op::DelService { key } => {
                self.services.remove(&key);
            }
            Op::PutRevNat { id, value } => {
                self.revnat.insert(id, value);
            }
            Op::DelRevNat { id } => {
                self.revnat.remove(&id);
            }
            Op::PurgeAffinity {
                rev_nat_id,
                backend_id,
            } => self
                .affinity
                .retain(|k, v| !purged(rev_nat_id, backend_id, k, v)),
        }
    }

    /// Frontends (headers) with the backends of their slots, as a connect() would see them.
    pub fn frontends(&self) -> BTreeMap<ServiceKey, FrontendView> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, header)| {
                let slots = (1..=header.count)
                    .map(|s| {
                        let id = self
                            .services
                            .get(&k.with_slot(s))
                            .map_or(0, |v| v.backend_id);
                        (id, self.backends.get(&id).copied())
                    })
                    .collect();
                (*k, (*header, slots))
            })
            .collect()
    }
}

/// Whether a purge of (`rev_nat_id`, `backend_id`) removes this affinity entry.
fn purged(rev_nat_id: u16, backend_id: Option<u32>, k: &AffinityKey, v: &AffinityValue) -> bool {
    k.rev_nat_id == rev_nat_id && backend_id.is_none_or(|b| b == v.backend_id)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgFrontend {
    rev_nat_id: u16,
    affinity_timeout: u32,
    /// Backend ids; index 0 is slot 1.
    slots: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackendRef {
    id: u32,
    refs: u32,
}

/// What the maps hold, as far as the agent knows.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    frontends: BTreeMap<Frontend, ProgFrontend>,
    backends: BTreeMap<(Endpoint, Proto), BackendRef>,
    next_backend_id: u32,
    free_backend_ids: Vec<u32>,
    next_rev_nat: u16,
    free_rev_nat: Vec<u16>,
    /// Entries found in the maps that no frontend accounts for; deleted by the next plan.
    stale: Vec<Op>,
}

/// The operations of one sync and what could not be programmed.
#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub warnings: Vec<String>,
}

impl Programmed {
    /// The programmed state that `snapshot` (maps left by an earlier agent) describes, so
    /// the first sync only corrects differences instead of flushing the datapath.
    pub fn adopt(snapshot: &Snapshot) -> Self {
        let mut me = Self::default();
        let mut used_backends = BTreeSet::new();
        let mut used_revnat = BTreeSet::new();
        let mut used_keys = BTreeSet::new();
        for (key, header) in snapshot.services.iter().filter(|(k, _)| k.slot == 0) {
            let Some(fe) = frontend_of(key) else {
                continue;
            };
            if header.rev_nat_id == 0 || !used_revnat.insert(header.rev_nat_id) {
                // Unusable header: drop the frontend; the sync writes it anew.
                continue;
            }
            used_keys.insert(*key);
            let mut slots = Vec::new();
            for s in 1..=header.count {
                let k = key.with_slot(s);
                let id = snapshot.services.get(&k).map_or(0, |v| v.backend_id);
                used_keys.insert(k);
                slots.push(id);
                used_backends.insert(id);
            }
            me.frontends.insert(
                fe,
                ProgFrontend {
                    rev_nat_id: header.rev_nat_id,
                    affinity_timeout: header.affinity_timeout,
                    slots,
                },
            );
        }
        for (id, b) in &snapshot.backends {
            let endpoint = Endpoint {
                addr: ip_of(&b.addr),
                port: b.port,
            };
            let known =
                Proto::from_number(b.proto).filter(|p| !me.backends.contains_key(&(endpoint, *p)));
            match known {
                Some(proto) if used_backends.contains(id) => {
                    me.backends
                        .insert((endpoint, proto), BackendRef { id: *id, refs: 0 });
                }
                _ => me.stale.push(Op::DelBackend { id: *id }),
            }
        }
        // Count references; slots that point at a missing backend get id 0 (rewritten).
        let ids: BTreeMap<u32, (Endpoint, Proto)> =
            me.backends.iter().map(|(k, r)| (r.id, *k)).collect();
        for fe in me.frontends.values_mut() {
            for slot in &mut fe.slots {
                match ids.get(slot) {
                    Some(k) => me.backends.get_mut(k).expect("just inserted").refs += 1,
                    None => *slot = 0,
                }
            }
        }
        for key in snapshot.services.keys().filter(|k| !used_keys.contains(k)) {
            me.stale.push(Op::DelService { key: *key });
        }
        for id in snapshot
            .revnat
            .keys()
            .filter(|id| !used_revnat.contains(id))
        {
            me.stale.push(Op::DelRevNat { id: *id });
        }
        me.next_backend_id = snapshot.backends.keys().max().copied().unwrap_or(0);
        me.next_rev_nat = used_revnat
            .iter()
            .chain(snapshot.revnat.keys())
            .max()
            .copied()
            .unwrap_or(0);
        me
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Entries each map holds, as programmed.
    pub fn map_entries(&self) -> BTreeMap<&'static str, usize> {
        let slots: usize = self.frontends.values().map(|f| f.slots.len()).sum();
        BTreeMap::from([
            (MAP_SERVICES, self.frontends.len() + slots),
            (MAP_BACKENDS, self.backends.len()),
            (MAP_REVNAT, self.frontends.len()),
        ])
    }

    fn acquire_backend(&mut self, ep: Endpoint, proto: Proto, ops: &mut Vec<Op>) -> u32 {
        if let Some(r) = self.backends.get_mut(&(ep, proto)) {
            r.refs += 1;
            return r.id;
        }
        let id = self.free_backend_ids.pop().unwrap_or_else(|| {
            self.next_backend_id += 1;
            self.next_backend_id
        });
        self.backends
            .insert((ep, proto), BackendRef { id, refs: 1 });
        ops.push(Op::PutBackend {
            id,
            value: Backend {
                addr: addr_of(ep.addr),
                port: ep.port,
                proto: proto.number(),
                flags: 0,
            },
        });
        id
    }

    fn alloc_rev_nat(&mut self) -> Option<u16> {
        if let Some(id) = self.free_rev_nat.pop() {
            return Some(id);
        }
        self.next_rev_nat = self.next_rev_nat.checked_add(1)?;
        Some(self.next_rev_nat)
    }

    /// Diffs against `desired`, updates `self` to the state after the returned operations,
    /// and returns them in a safe order.
    pub fn plan(&mut self, desired: &Desired) -> Plan {
        let mut plan = Plan::default();
        let mut backend_ops = Vec::new();
        let mut frontend_ops = Vec::new();
        let mut purge_ops = Vec::new();
        let mut removal_ops = Vec::new();
        // Old slot contents whose references are dropped once every acquire is done, so
        // a backend moving between frontends keeps its id.
        let mut released: Vec<(u32, Proto)> = Vec::new();

        for (fe, state) in &desired.frontends {
            let mut endpoints: Vec<Endpoint> = state.endpoints.iter().copied().collect();
            if endpoints.len() > usize::from(MAX_SLOTS) {
                plan.warnings.push(format!(
                    "{} ({fe}): {} endpoints, only the first {MAX_SLOTS} are used",
                    state.service,
                    endpoints.len()
                ));
                endpoints.truncate(usize::from(MAX_SLOTS));
            }
            let old = self.frontends.get(fe).cloned();
            let rev_nat_id = match &old {
                Some(o) => o.rev_nat_id,
                None => match self.alloc_rev_nat() {
                    Some(id) => {
                        frontend_ops.push(Op::PutRevNat {
                            id,
                            value: RevNat {
                                addr: addr_of(fe.addr),
                                port: fe.port,
                                _pad: [0; 2],
                            },
                        });
                        id
                    }
                    None => {
                        plan.warnings.push(format!(
                            "{} ({fe}): no free rev-NAT id ({} frontends in use); not programmed",
                            state.service,
                            u16::MAX
                        ));
                        continue;
                    }
                },
            };
            let wanted: Vec<u32> = endpoints
                .iter()
                .map(|ep| self.acquire_backend(*ep, fe.proto, &mut backend_ops))
                .collect();
            let old_slots = old.as_ref().map(|o| o.slots.clone()).unwrap_or_default();
            released.extend(old_slots.iter().map(|id| (*id, fe.proto)));
            let new_slots = stable_slots(&old_slots, &wanted);
            let timeout = state.affinity_timeout;
            let old_timeout = old.as_ref().map(|o| o.affinity_timeout);
            match old_timeout {
                // A new frontend may reuse the rev-NAT id of a removed one: its
                // entries must not be found. Purged before the header exists.
                None if timeout != 0 => backend_ops.push(Op::PurgeAffinity {
                    rev_nat_id,
                    backend_id: None,
                }),
                Some(t) if t != timeout => purge_ops.push(Op::PurgeAffinity {
                    rev_nat_id,
                    backend_id: None,
                }),
                Some(_) if timeout != 0 => {
                    let kept: BTreeSet<u32> = new_slots.iter().copied().collect();
                    let left: BTreeSet<u32> = old_slots
                        .iter()
                        .filter(|id| !kept.contains(id))
                        .copied()
                        .collect();
                    purge_ops.extend(left.into_iter().map(|id| Op::PurgeAffinity {
                        rev_nat_id,
                        backend_id: Some(id),
                    }));
                }
                _ => {}
            }
            for (i, id) in new_slots.iter().enumerate() {
                if old_slots.get(i) != Some(id) {
                    frontend_ops.push(Op::PutService {
                        key: service_key(fe, i as u16 + 1),
                        value: ServiceValue::slot(*id),
                    });
                }
            }
            if old.is_none() || old_slots.len() != new_slots.len() || old_timeout != Some(timeout) {
                frontend_ops.push(Op::PutService {
                    key: service_key(fe, 0),
                    value: ServiceValue::header(new_slots.len() as u16, rev_nat_id, timeout),
                });
            }
            for i in new_slots.len()..old_slots.len() {
                frontend_ops.push(Op::DelService {
                    key: service_key(fe, i as u16 + 1),
                });
            }
            self.frontends.insert(
                *fe,
                ProgFrontend {
                    rev_nat_id,
                    affinity_timeout: timeout,
                    slots: new_slots,
                },
            );
        }

        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !desired.frontends.contains_key(fe))
            .copied()
            .collect();
        for fe in gone {
            let old = self.frontends.remove(&fe).expect("listed above");
            removal_ops.push(Op::DelService {
                key: service_key(&fe, 0),
            });
            for i in 0..old.slots.len() {
                removal_ops.push(Op::DelService {
                    key: service_key(&fe, i as u16 + 1),
                });
            }
            removal_ops.push(Op::DelRevNat { id: old.rev_nat_id });
            self.free_rev_nat.push(old.rev_nat_id);
            released.extend(old.slots.iter().map(|id| (*id, fe.proto)));
        }

        // Drop the old references; backends left without any are deleted last.
        let by_id: BTreeMap<u32, (Endpoint, Proto)> =
            self.backends.iter().map(|(k, r)| (r.id, *k)).collect();
        for (id, _) in released {
            if let Some(k) = by_id.get(&id) {
                let r = self.backends.get_mut(k).expect("indexed above");
                r.refs = r.refs.saturating_sub(1);
            }
        }
        let unused: Vec<(Endpoint, Proto)> = self
            .backends
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        let mut gc_ops = Vec::new();
        for k in unused {
            let r = self.backends.remove(&k).expect("listed above");
            gc_ops.push(Op::DelBackend { id: r.id });
            self.free_backend_ids.push(r.id);
        }

        plan.ops = backend_ops;
        plan.ops.extend(frontend_ops);
        plan.ops.extend(purge_ops);
        plan.ops.extend(removal_ops);
        plan.ops.extend(gc_ops);
        plan.ops.append(&mut self.stale);
        plan
    }
}

/// New slot contents for a frontend: backends that stay keep their slot, new ones fill
/// the holes, and the tail is moved into holes that remain.
fn stable_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut kept = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| (wanted_set.contains(id) && kept.insert(*id)).then_some(*id))
        .collect();
    let mut new_ids = wanted.iter().filter(|id| !kept.contains(id)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match new_ids.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(new_ids.map(Some));
    loop {
        while slots.last() == Some(&None) {
            slots.pop();
        }
        let Some(hole) = slots.iter().position(Option::is_none) else {
            break;
        };
        slots[hole] = slots.pop().expect("a Some is last");
    }
    slots.into_iter().flatten().collect()
}

/// Errors of the BPF map layer; each names the map and the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("opening pinned map {path}: {source} (is the agent running with this --pin-path?)")]
    OpenPinned {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op}: {source}{hint}")]
    Write {
        op: String,
        hint: &'static str,
        #[source]
        source: MapError,
    },
}

/// The maps the agent writes, open for reading and writing.
pub struct BpfMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    revnat: HashMap<MapData, u16, RevNat>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

fn typed<K: aya::Pod, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    HashMap::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

impl BpfMaps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, DatapathError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DatapathError::MissingMap { map: name })
        };
        Ok(Self {
            services: typed(take(MAP_SERVICES)?, MAP_SERVICES)?,
            backends: typed(take(MAP_BACKENDS)?, MAP_BACKENDS)?,
            revnat: typed(take(MAP_REVNAT)?, MAP_REVNAT)?,
            affinity: typed(take(MAP_AFFINITY)?, MAP_AFFINITY)?,
        })
    }

    /// Opens the maps an agent pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, DatapathError> {
        let open = |name: &'static str| {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            services: typed(Map::HashMap(open(MAP_SERVICES)?), MAP_SERVICES)?,
            backends: typed(Map::HashMap(open(MAP_BACKENDS)?), MAP_BACKENDS)?,
            revnat: typed(Map::HashMap(open(MAP_REVNAT)?), MAP_REVNAT)?,
            affinity: typed(Map::LruHashMap(open(MAP_AFFINITY)?), MAP_AFFINITY)?,
        })
    }

    /// Reads every entry.
    pub fn snapshot(&self) -> Result<Snapshot, DatapathError> {
        let err = |map| move |source| DatapathError::Map { map, source };
        let mut snap = Snapshot::default();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(err(MAP_SERVICES))?;
            snap.services.insert(k, v);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.map_err(err(MAP_BACKENDS))?;
            snap.backends.insert(k, v);
        }
        for entry in self.revnat.iter() {
            let (k, v) = entry.map_err(err(MAP_REVNAT))?;
            snap.revnat.insert(k, v);
        }
        // Entries may be evicted while we iterate: skip the ones that vanished.
        snap.affinity.extend(self.affinity.iter().flatten());
        Ok(snap)
    }

    /// Deletes the affinity entries that any of `purges` (rev-NAT id, backend) names, in
    /// one pass over the map.
    fn purge_affinity(&mut self, purges: &[(u16, Option<u32>)]) -> Result<(), MapError> {
        let doomed: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| purges.iter().any(|(r, b)| purged(*r, *b, k, v)))
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            ignore_missing(self.affinity.remove(&k))?;
        }
        Ok(())
    }

    /// Applies the operations in order; stops at the first that fails. A run of
    /// consecutive affinity purges is one pass over the affinity map.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        let mut i = 0;
        while i < ops.len() {
            let op = &ops[i];
            i += 1;
            let result = match *op {
                Op::PurgeAffinity { .. } => {
                    let mut purges = Vec::new();
                    for o in &ops[i - 1..] {
                        let Op::PurgeAffinity {
                            rev_nat_id,
                            backend_id,
                        } = *o
                        else {
                            break;
                        };
                        purges.push((rev_nat_id, backend_id));
                    }
                    i += purges.len() - 1;
                    self.purge_affinity(&purges)
                }
                Op::PutBackend { id, value } => self.backends.insert(id, value, 0),
                Op::DelBackend { id } => ignore_missing(self.backends.remove(&id)),
                Op::PutService { key, value } => self.services.insert(key, value, 0),
                Op::DelService { key } => ignore_missing(self.services.remove(&key)),
                Op::PutRevNat { id, value } => self.revnat.insert(id, value, 0),
                Op::DelRevNat { id } => ignore_missing(self.revnat.remove(&id)),
            };
            result.map_err(|source| {
                let full = matches!(&source, MapError::SyscallError(e)
                    if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)));
                DatapathError::Write {
                    op: op.to_string(),
                    hint: if full {
                        " (the map is full: too many services or endpoints for its capacity)"
                    } else {
                        ""
                    },
                    source,
                }
            })?;
        }
        Ok(())
    }
}

/// The per-program counters from the maps pinned under `dir`, summed over CPUs, in
/// `PROG_NAMES` order.
pub fn read_counters(dir: &Path) -> Result<Vec<(&'static str, Counters)>, DatapathError> {
    let path = dir.join(MAP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.display().to_string(),
        source,
    })?;
    let array: PerCpuArray<MapData, Counters> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| DatapathError::Map {
            map: MAP_COUNTERS,
            source,
        })?;
    PROG_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let per_cpu = array
                .get(&(i as u32), 0)
                .map_err(|source| DatapathError::Map {
                    map: MAP_COUNTERS,
                    source,
                })?;
            let mut total = Counters::default();
            for c in per_cpu.iter() {
                total.add(c);
            }
            Ok((*name, total))
        })
        .collect()
}

/// Deleting an entry that is already gone is what we wanted.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::FrontendState;

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last).into(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn desired(entries: &[(Frontend, &[u8])]) -> Desired {
        Desired {
            frontends: entries
                .iter()
                .map(|(f, backends)| {
                    (
                        *f,
                        FrontendState {
                            service: format!("ns/{}", f.port),
                            endpoints: backends
                                .iter()
                                .map(|b| Endpoint {
                                    addr: Ipv4Addr::new(10, 244, *b, 2).into(),
                                    port: 8080,
                                })
                                .collect(),
                            affinity_timeout: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    /// What a connect() could see at this moment: every header's slots and backends exist.
    fn assert_consistent(maps: &Snapshot, after: &Op) {
        for (key, (header, slots)) in maps.frontends() {
            assert!(
                maps.revnat.contains_key(&header.rev_nat_id),
                "after `{after}`: {key:?} has no rev-NAT entry"
            );
            for (i, (id, backend)) in slots.iter().enumerate() {
                assert!(
                    backend.is_some(),
                    "after `{after}`: slot {} of {key:?} -> backend {id} missing",
                    i + 1
                );
            }
        }
    }

    /// Runs a sync against in-memory maps, checking consistency after every single op.
    fn sync(prog: &mut Programmed, maps: &mut Snapshot, d: &Desired) -> Vec<Op> {
        let plan = prog.plan(d);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        for op in &plan.ops {
            maps.apply(op);
            assert_consistent(maps, op);
        }
        plan.ops
    }

    /// The backends each frontend balances to, read back from the maps.
    fn served(maps: &Snapshot) -> BTreeMap<Frontend, BTreeSet<Endpoint>> {
        maps.frontends()
            .into_iter()
            .map(|(k, (_, slots))| {
                let eps = slots
                    .into_iter()
                    .map(|(_, b)| {
                        let b = b.unwrap();
                        Endpoint {
                            addr: ip_of(&b.addr),
                            port: b.port,
                        }
                    })
                    .collect();
                (frontend_of(&k).unwrap(), eps)
            })
            .collect()
    }

    fn expected(d: &Desired) -> BTreeMap<Frontend, BTreeSet<Endpoint>> {
        d.frontends
            .iter()
            .map(|(f, s)| (*f, s.endpoints.clone()))
            .collect()
    }

    #[test]
    fn every_step_keeps_services_consistent_and_ends_equal_to_desired() {
        let steps = [
            desired(&[(fe(1, 80), &[1, 2, 3])]),
            desired(&[(fe(1, 80), &[1, 3]), (fe(2, 53), &[3, 4])]),
            desired(&[(fe(1, 80), &[1, 3, 5, 6, 7]), (fe(2, 53), &[])]),
            desired(&[(fe(1, 80), &[7]), (fe(3, 80), &[1, 2])]),
            desired(&[(fe(3, 80), &[2, 1])]),
            desired(&[]),
        ];
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        for d in &steps {
            sync(&mut prog, &mut maps, d);
            assert_eq!(served(&maps), expected(d));
            // No leftovers: every slot entry belongs to a header, every backend is used.
            let used: BTreeSet<u32> = maps
                .frontends()
                .values()
                .flat_map(|(_, s)| s.iter().map(|(id, _)| *id))
                .collect();
            assert_eq!(maps.backends.keys().copied().collect::<BTreeSet<_>>(), used);
            let slot_entries = maps.services.len() - maps.frontends().len();
            assert_eq!(
                slot_entries,
                maps.frontends()
                    .values()
                    .map(|(_, s)| s.len())
                    .sum::<usize>()
            );
            assert_eq!(maps.revnat.len(), maps.frontends().len());
        }
        assert_eq!(maps, Snapshot::default());
    }

    #[test]
    fn one_endpoint_change_costs_few_writes() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(
            &mut prog,
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 2, 3, 4, 5, 6])]),
        );
        // Remove backend 2: the last slot moves into its place, the header shrinks,
        // the last slot and the backend are deleted.
        let ops = sync(
            &mut prog,
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 3, 4, 5, 6])]),
        );
        assert_eq!(ops.len(), 4, "{ops:#?}");
        // Add one: a new backend, one slot, the header.
        let ops = sync(
            &mut prog,
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 3, 4, 5, 6, 9])]),
        );
        assert_eq!(ops.len(), 3, "{ops:#?}");
        // Nothing changed: nothing written.
        let ops = sync(
            &mut prog,
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 3, 4, 5, 6, 9])]),
        );
        assert!(ops.is_empty(), "{ops:#?}");
    }

    #[test]
    fn shared_backend_keeps_its_id_when_it_moves_between_frontends() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(&mut prog, &mut maps, &desired(&[(fe(1, 80), &[1])]));
        let id_before = *maps.backends.keys().next().unwrap();
        let ops = sync(&mut prog, &mut maps, &desired(&[(fe(2, 80), &[1])]));
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::DelBackend { .. } | Op::PutBackend { .. }))
        );
        assert_eq!(*maps.backends.keys().next().unwrap(), id_before);
    }

    #[test]
    fn adopting_maps_of_an_earlier_agent_changes_only_the_difference() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let d = desired(&[(fe(1, 80), &[1, 2]), (fe(2, 53), &[2, 3])]);
        sync(&mut prog, &mut maps, &d);
        // Garbage a crashed agent could leave: a stray slot, an unused backend and rev-NAT.
        maps.services
            .insert(service_key(&fe(9, 9), 3), ServiceValue::slot(77));
        maps.backends.insert(
            77,
            Backend {
                addr: lb_common::v4_mapped([1, 1, 1, 1]),
                port: 1,
                proto: 6,
                flags: 0,
            },
        );
        maps.revnat.insert(
            999,
            RevNat {
                addr: lb_common::v4_mapped([9, 9, 9, 9]),
                port: 9,
                _pad: [0; 2],
            },
        );
        let mut adopted = Programmed::adopt(&maps);
        let ops = sync(&mut adopted, &mut maps, &d);
        assert_eq!(ops.len(), 3, "only the garbage is removed: {ops:#?}");
        assert_eq!(served(&maps), expected(&d));
        let d2 = desired(&[(fe(1, 80), &[2, 4])]);
        sync(&mut adopted, &mut maps, &d2);
        assert_eq!(served(&maps), expected(&d2));
        assert_eq!(maps.backends.len(), 2);
    }

    #[test]
    fn stable_slots_keeps_positions() {
        assert_eq!(stable_slots(&[], &[5, 6]), [5, 6]);
        assert_eq!(stable_slots(&[1, 2, 3], &[1, 3]), [1, 3]);
        assert_eq!(stable_slots(&[1, 2, 3, 4], &[4, 3]), [4, 3]);
        assert_eq!(stable_slots(&[1, 2, 3], &[3, 9, 1]), [1, 9, 3]);
        assert_eq!(stable_slots(&[1, 2, 3], &[]), Vec::<u32>::new());
        assert_eq!(
            stable_slots(&[1, 1, 0], &[1, 2]),
            [1, 2],
            "duplicates and id 0 are holes"
        );
    }

    fn with_affinity(mut d: Desired, timeout: u32) -> Desired {
        for s in d.frontends.values_mut() {
            s.affinity_timeout = timeout;
        }
        d
    }

    /// An affinity entry as the program would write it for client `netns`.
    fn remember(maps: &mut Snapshot, fe: &Frontend, netns: u64, backend: u8) {
        let header = maps.services[&service_key(fe, 0)];
        let want = addr_of(Ipv4Addr::new(10, 244, backend, 2).into());
        let (id, _) = maps
            .backends
            .iter()
            .find(|(_, b)| b.addr == want)
            .expect("backend programmed");
        maps.affinity.insert(
            AffinityKey {
                netns_cookie: netns,
                rev_nat_id: header.rev_nat_id,
                _pad: [0; 6],
            },
            AffinityValue {
                backend_id: *id,
                _pad: [0; 4],
                last_used_ns: 1,
            },
        );
    }

    #[test]
    fn affinity_entries_of_a_leaving_backend_are_purged_the_others_kept() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let d = with_affinity(desired(&[(fe(1, 80), &[1, 2, 3])]), 30);
        sync(&mut prog, &mut maps, &d);
        assert_eq!(
            maps.services[&service_key(&fe(1, 80), 0)].affinity_timeout,
            30
        );
        remember(&mut maps, &fe(1, 80), 100, 1);
        remember(&mut maps, &fe(1, 80), 200, 2);
        let ops = sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1, 3])]), 30),
        );
        let purges: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o, Op::PurgeAffinity { .. }))
            .collect();
        assert_eq!(purges.len(), 1, "{ops:#?}");
        let clients: Vec<u64> = maps.affinity.keys().map(|k| k.netns_cookie).collect();
        assert_eq!(clients, [100], "the client of backend 2 chooses again");
        // The purge comes after the slots no longer list the backend, before its delete.
        let purge_at = ops
            .iter()
            .position(|o| matches!(o, Op::PurgeAffinity { .. }));
        let header_at = ops
            .iter()
            .position(|o| matches!(o, Op::PutService { key, .. } if key.slot == 0));
        let del_at = ops.iter().position(|o| matches!(o, Op::DelBackend { .. }));
        assert!(header_at < purge_at && purge_at < del_at, "{ops:#?}");
    }

    #[test]
    fn affinity_timeout_change_rewrites_the_header_and_forgets_clients() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1, 2])]), 30),
        );
        remember(&mut maps, &fe(1, 80), 100, 1);
        let ops = sync(&mut prog, &mut maps, &desired(&[(fe(1, 80), &[1, 2])]));
        assert_eq!(ops.len(), 2, "header and purge: {ops:#?}");
        assert_eq!(
            maps.services[&service_key(&fe(1, 80), 0)].affinity_timeout,
            0
        );
        assert!(maps.affinity.is_empty());
    }

    #[test]
    fn a_new_affinity_frontend_never_sees_entries_of_a_reused_rev_nat_id() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1])]), 30),
        );
        remember(&mut maps, &fe(1, 80), 100, 1);
        sync(&mut prog, &mut maps, &desired(&[]));
        // The id is free again; the next frontend gets it, and a stale entry with it.
        let ops = sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(2, 80), &[1])]), 30),
        );
        let purge_at = ops
            .iter()
            .position(|o| {
                matches!(
                    o,
                    Op::PurgeAffinity {
                        backend_id: None,
                        ..
                    }
                )
            })
            .expect("purged");
        let header_at = ops
            .iter()
            .position(|o| matches!(o, Op::PutService { key, .. } if key.slot == 0))
            .unwrap();
        assert!(purge_at < header_at, "{ops:#?}");
        assert!(maps.affinity.is_empty());
    }

    #[test]
    fn ipv6_frontends_and_backends_round_trip_through_the_maps() {
        let v6 = Frontend {
            addr: "fd00:96::a".parse().unwrap(),
            port: 443,
            proto: Proto::Tcp,
        };
        let ep = Endpoint {
            addr: "fd00:244:1::2".parse().unwrap(),
            port: 8443,
        };
        let mut d = desired(&[(fe(1, 443), &[1])]);
        d.frontends.insert(
            v6,
            FrontendState {
                service: "ns/dual".into(),
                endpoints: [ep].into(),
                affinity_timeout: 0,
            },
        );
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(&mut prog, &mut maps, &d);
        assert_eq!(served(&maps), expected(&d));
        assert_eq!(
            maps.services.keys().next().unwrap().addr[..12],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            "IPv4 sorts first, mapped"
        );
        let adopted = Programmed::adopt(&maps);
        assert_eq!(adopted.frontend_count(), 2);
        assert_eq!(adopted.backend_count(), 2);
    }
}
