//! The diff: what the maps hold ([`Programmed`]) against what is desired, as map
//! operations in a safe order (see the module above). Pure: no BPF here.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    BACKEND_F_LOCAL, Backend, FRONTEND_F_KEEP_SOCKETS, FrontendName, FrontendPort, MAP_BACKENDS,
    MAP_REVNAT, MAP_SERVICES, MAP_SOURCE_RANGES, MAX_SLOTS, RevNat, SVC_F_NO_LOCAL,
    SVC_F_SOURCE_RANGES, ServiceKey, ServiceValue,
};

use super::ops::{
    Op, Snapshot, addr_of, frontend_of, frontend_port, ip_of, range_key, range_of, service_key,
};
use crate::model::{Desired, Endpoint, Frontend, FrontendState, Proto, Scope};

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgFrontend {
    rev_nat_id: u16,
    /// The Service port it belongs to and its kind, as the names map holds them.
    name: FrontendName,
    affinity_timeout: u32,
    /// Backend ids; index 0 is slot 1.
    slots: Vec<u32>,
    /// Source ranges (network, prefix length); the header has `SVC_F_SOURCE_RANGES`
    /// when there are any.
    source_ranges: BTreeSet<(IpAddr, u8)>,
    /// The header's `SVC_F_*` flags and affinity generation.
    flags: u8,
    epoch: u8,
    /// The Service keeps its clients' sockets when a backend leaves.
    keep_sockets: bool,
    /// The fingerprint of its Maglev table, if it has one.
    maglev: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackendRef {
    id: u32,
    refs: u32,
}

/// What adopted frontends use of the maps left by an earlier agent.
#[derive(Default)]
struct Used {
    backends: BTreeSet<u32>,
    revnat: BTreeSet<u16>,
    keys: BTreeSet<ServiceKey>,
}

/// What the maps hold, as far as the agent knows.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    frontends: BTreeMap<Frontend, ProgFrontend>,
    backends: BTreeMap<(Endpoint, Proto), BackendRef>,
    /// Backend id -> its key in `backends`.
    by_id: BTreeMap<u32, (Endpoint, Proto)>,
    /// Slots and source ranges over every frontend (kept, not counted per sync).
    slots_total: usize,
    ranges_total: usize,
    next_backend_id: u32,
    /// The last affinity generation handed out.
    last_epoch: u8,
    next_rev_nat: u16,
    free_rev_nat: Vec<u16>,
    /// Entries found in the maps that no frontend accounts for; deleted by the next plan.
    stale: Vec<Op>,
    /// How much the maps hold (their max_entries).
    capacity: Capacity,
    /// Services-map entries that frontends shrinking in the plan being made give back:
    /// their deletes come after every write of that plan, so the room counts from the
    /// next one.
    freed_in_plan: usize,
    /// Desired frontends left out (or left as they were) because a map was full, with
    /// the warning given; every plan tries them again (and warns again only when the
    /// warning changes).
    skipped: BTreeMap<Frontend, String>,
    /// Programmed frontends per (address, port, protocol): the frontend-ports map holds
    /// the keys counted here.
    port_refs: BTreeMap<FrontendPort, u32>,
    /// Changed frontends that a part of a first sync left for later ([`Self::plan_new`]);
    /// the next [`Self::plan_changes`] plans them.
    deferred: BTreeSet<Frontend>,
}

/// The maps' capacities, as the plan counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Frontends (the rev-NAT and names maps).
    pub frontends: usize,
    /// Headers and slots (the services map).
    pub service_entries: usize,
    pub backends: usize,
    /// Source ranges over every frontend.
    pub source_ranges: usize,
    /// `--lb-algorithm maglev`: the size of the external frontends' Maglev tables;
    /// `None` (random) plans no table and deletes those there are.
    pub maglev_table_size: Option<u32>,
}

/// The maps' default sizes (lb-user's `--max-*` defaults).
impl Default for Capacity {
    fn default() -> Self {
        Self {
            frontends: lb_common::MAX_REVNAT as usize,
            service_entries: lb_common::MAX_REVNAT as usize
                + lb_common::MAX_SERVICE_ENTRIES as usize,
            backends: lb_common::MAX_BACKENDS as usize,
            source_ranges: lb_common::MAX_SOURCE_RANGES as usize,
            maglev_table_size: None,
        }
    }
}

/// A frontend (address, port), a backend (address, port) that left it, and the
/// protocol (`lb_common::PROTO_*`): the sockets translated to that backend are closed.
pub type Left = ((IpAddr, u16), (IpAddr, u16), u8);

/// The operations of one sync and what could not be programmed.
#[derive(Debug, Default)]
pub struct Plan {
    /// The operations in order, in the groups the plan made them in (not copied into
    /// one list: a first sync at 10k services plans a quarter of a million).
    pub groups: Vec<Vec<Op>>,
    pub warnings: Vec<String>,
    /// The map that was full, for each frontend left out.
    pub full: Vec<&'static str>,
    /// (frontend, backend) pairs of the socket level that this plan ends, but for
    /// Services that keep their sockets: the sockets translated to them are closed.
    pub left: BTreeSet<Left>,
}

impl Plan {
    /// Every operation, in order.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.groups.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.iter().all(Vec::is_empty)
    }
}

impl Programmed {
    /// The programmed state that `snapshot` (maps left by an earlier agent) describes, so
    /// the first sync only corrects differences instead of flushing the datapath.
    pub fn adopt(snapshot: &Snapshot) -> Self {
        let mut me = Self::default();
        let used = me.adopt_frontends(snapshot);
        me.adopt_backends(snapshot, &used.backends);
        me.stale_entries(snapshot, &used);
        me.adopt_ports(snapshot);
        me.slots_total = me.frontends.values().map(|f| f.slots.len()).sum();
        me.ranges_total = me.frontends.values().map(|f| f.source_ranges.len()).sum();
        // Above every id a map still names, affinity entries included: an id is never
        // handed out again while an entry might lead to it.
        me.next_backend_id = snapshot
            .backends
            .keys()
            .copied()
            .chain(snapshot.affinity.values().map(|v| v.backend_id))
            .max()
            .unwrap_or(0);
        me.last_epoch = snapshot
            .services
            .values()
            .map(|v| v.epoch)
            .max()
            .unwrap_or(0);
        // Above every id any map still holds: an id whose stale entries the first plan
        // deletes (at its end) is never handed to a new frontend in that same plan.
        let held: BTreeSet<u16> = used
            .revnat
            .iter()
            .chain(snapshot.revnat.keys())
            .chain(snapshot.names.keys())
            .chain(snapshot.source_ranges.iter().map(|(id, _, _)| id))
            .chain(snapshot.affinity.keys().map(|k| &k.rev_nat_id))
            .copied()
            .collect();
        me.next_rev_nat = held.last().copied().unwrap_or(0);
        // The gaps below it are free: an agent that restarts after many frontends went
        // hands them out again (lowest first) instead of running out of ids.
        me.free_rev_nat = (1..me.next_rev_nat)
            .rev()
            .filter(|id| !held.contains(id))
            .collect();
        me
    }

    /// What the maps hold now (`snapshot`, read back for a periodic reconcile), with what
    /// only the agent knows carried over from `self`: the capacity, and the frontends a
    /// full map keeps out (so their warnings are not given again). The next plan against
    /// the desired state then repairs whatever changed behind the agent's back.
    pub fn readopt(&self, snapshot: &Snapshot) -> Self {
        let mut me = Self::adopt(snapshot);
        me.capacity = self.capacity;
        me.skipped = self.skipped.clone();
        me
    }

    /// The frontends of `snapshot` with a usable header, their slots and source ranges;
    /// returns what they use.
    fn adopt_frontends(&mut self, snapshot: &Snapshot) -> Used {
        let mut used = Used::default();
        for (key, header) in snapshot.services.iter().filter(|(k, _)| k.slot == 0) {
            let Some(fe) = frontend_of(key) else {
                continue;
            };
            if header.rev_nat_id == 0 || !used.revnat.insert(header.rev_nat_id) {
                // Unusable header: drop the frontend; the sync writes it anew.
                continue;
            }
            used.keys.insert(*key);
            // A rev-NAT entry that is missing or names another address: written again
            // first (the replies of this frontend's connections depend on it).
            let revnat = RevNat {
                addr: addr_of(fe.addr),
                port: fe.port,
                _pad: [0; 2],
            };
            if snapshot.revnat.get(&header.rev_nat_id) != Some(&revnat) {
                self.stale.push(Op::PutRevNat {
                    id: header.rev_nat_id,
                    value: revnat,
                });
            }
            let mut slots = Vec::new();
            for s in 1..=header.count {
                let k = key.with_slot(s);
                let id = snapshot.services.get(&k).map_or(0, |v| v.backend_id);
                used.keys.insert(k);
                slots.push(id);
                used.backends.insert(id);
            }
            let source_ranges = snapshot
                .source_ranges
                .iter()
                .filter(|(id, _, _)| *id == header.rev_nat_id)
                .map(|(_, addr, prefix)| range_of(addr, *prefix))
                .collect();
            self.frontends.insert(
                fe,
                ProgFrontend {
                    rev_nat_id: header.rev_nat_id,
                    name: snapshot
                        .names
                        .get(&header.rev_nat_id)
                        .copied()
                        .unwrap_or(FrontendName::new("")),
                    affinity_timeout: header.affinity_timeout,
                    flags: header.flags,
                    epoch: header.epoch,
                    keep_sockets: snapshot
                        .names
                        .get(&header.rev_nat_id)
                        .is_some_and(|n| n.flags & FRONTEND_F_KEEP_SOCKETS != 0),
                    slots,
                    source_ranges,
                    maglev: snapshot.maglev.get(key).map(|&(_, fp)| fp),
                },
            );
        }
        used
    }

    /// The backends the adopted frontends use, with their references counted; slots that
    /// point at a missing backend get id 0 (rewritten by the sync).
    fn adopt_backends(&mut self, snapshot: &Snapshot, used: &BTreeSet<u32>) {
        for (id, b) in &snapshot.backends {
            let endpoint = Endpoint {
                addr: ip_of(&b.addr),
                port: b.port,
                local: b.flags & BACKEND_F_LOCAL != 0,
            };
            let known = Proto::from_number(b.proto)
                .filter(|p| !self.backends.contains_key(&(endpoint, *p)));
            match known {
                Some(proto) if used.contains(id) => {
                    self.backends
                        .insert((endpoint, proto), BackendRef { id: *id, refs: 0 });
                }
                _ => self.stale.push(Op::DelBackend { id: *id }),
            }
        }
        self.by_id = self.backends.iter().map(|(k, r)| (r.id, *k)).collect();
        for fe in self.frontends.values_mut() {
            for slot in &mut fe.slots {
                match self.by_id.get(slot) {
                    Some(k) => self.backends.get_mut(k).expect("just inserted").refs += 1,
                    None => *slot = 0,
                }
            }
        }
    }

    /// Entries of `snapshot` that no adopted frontend accounts for: deleted by the next plan.
    fn stale_entries(&mut self, snapshot: &Snapshot, used: &Used) {
        for key in snapshot.maglev.keys().filter(|k| !used.keys.contains(k)) {
            self.stale.push(Op::DelMaglev { key: *key });
        }
        for key in snapshot.services.keys().filter(|k| !used.keys.contains(k)) {
            self.stale.push(Op::DelService { key: *key });
        }
        for id in snapshot
            .revnat
            .keys()
            .filter(|id| !used.revnat.contains(id))
        {
            self.stale.push(Op::DelRevNat { id: *id });
        }
        for id in snapshot.names.keys().filter(|id| !used.revnat.contains(id)) {
            self.stale.push(Op::DelName { id: *id });
        }
        for &(rev_nat_id, addr, prefix) in &snapshot.source_ranges {
            if !used.revnat.contains(&rev_nat_id) {
                self.stale.push(Op::DelSourceRange {
                    rev_nat_id,
                    addr,
                    prefix,
                });
            }
        }
    }

    /// The frontend ports of the adopted frontends, counted; the first plan deletes the
    /// keys of the map that none has and writes those it lacks (maps left by an agent
    /// that had no such map).
    fn adopt_ports(&mut self, snapshot: &Snapshot) {
        for fe in self.frontends.keys() {
            *self.port_refs.entry(frontend_port(fe)).or_default() += 1;
        }
        for key in &snapshot.frontend_ports {
            if !self.port_refs.contains_key(key) {
                self.stale.push(Op::DelFrontendPort { key: *key });
            }
        }
        for key in self.port_refs.keys() {
            if !snapshot.frontend_ports.contains(key) {
                self.stale.push(Op::PutFrontendPort { key: *key });
            }
        }
    }

    /// The maps' capacities (read from the maps themselves: pinned ones keep the size
    /// they were made with).
    pub fn set_capacity(&mut self, capacity: Capacity) {
        self.capacity = capacity;
    }

    /// `--lb-algorithm`: `Some(table size)` for maglev (every external frontend with
    /// backends gets a table), `None` for random (tables there are get deleted).
    pub fn set_maglev(&mut self, size: Option<u32>) {
        self.capacity.maglev_table_size = size;
    }

    /// Maglev tables programmed, and the bytes their elements take.
    pub fn maglev_tables(&self) -> (usize, u64) {
        let n = self
            .frontends
            .values()
            .filter(|f| f.maglev.is_some())
            .count();
        let each = self
            .capacity
            .maglev_table_size
            .map_or(0, crate::maglev::table_bytes);
        (n, n as u64 * each)
    }

    /// The Maglev table `fe` should have with the backends `slots`: one for an external
    /// frontend (nodePort, externalIP, LoadBalancer IP, either scope) with backends,
    /// in maglev mode.
    fn maglev_spec(&self, state: &FrontendState, slots: &[u32]) -> Option<crate::maglev::Spec> {
        let size = self.capacity.maglev_table_size?;
        if state.kind == crate::model::FrontendKind::ClusterIp || slots.is_empty() {
            return None;
        }
        let backends = slots
            .iter()
            .filter_map(|id| {
                let (ep, _) = self.by_id.get(id)?;
                let b = crate::maglev::Backend {
                    addr: ep.addr,
                    port: ep.port,
                };
                Some((*id, b))
            })
            .collect();
        Some(crate::maglev::Spec::new(size, backends))
    }

    /// The Maglev table of `fe` with the backends `slots`: written when it differs from
    /// the one `old` has (its fingerprint), deleted when it should have none; returns the
    /// new table's fingerprint.
    fn plan_maglev(
        &self,
        fe: &Frontend,
        state: &FrontendState,
        old: Option<&ProgFrontend>,
        slots: &[u32],
        steps: &mut Steps,
    ) -> Option<u64> {
        let spec = self.maglev_spec(state, slots);
        let old = old.and_then(|o| o.maglev);
        let key = service_key(fe, 0);
        match spec {
            Some(spec) => {
                let fingerprint = spec.fingerprint;
                if old != Some(fingerprint) {
                    let spec = Box::new(spec);
                    steps.maglev.push(Op::PutMaglev { key, spec });
                }
                Some(fingerprint)
            }
            None => {
                if old.is_some() {
                    steps.maglev.push(Op::DelMaglev { key });
                }
                None
            }
        }
    }

    /// Desired frontends a full map kept out; the next plan tries them again.
    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Entries each map holds, as programmed.
    pub fn map_entries(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            (MAP_SERVICES, self.frontends.len() + self.slots_total),
            (MAP_BACKENDS, self.backends.len()),
            (MAP_REVNAT, self.frontends.len()),
            (MAP_SOURCE_RANGES, self.ranges_total),
            (lb_common::MAP_MAGLEV, self.maglev_tables().0),
        ])
    }

    fn acquire_backend(&mut self, ep: Endpoint, proto: Proto, ops: &mut Vec<Op>) -> u32 {
        if let Some(r) = self.backends.get_mut(&(ep, proto)) {
            r.refs += 1;
            return r.id;
        }
        // Never an id used before (until 2^32 backends later): an affinity entry that
        // outlives its backend then finds no backend, never another service's.
        self.next_backend_id = self.next_backend_id.checked_add(1).unwrap_or(1);
        let id = self.next_backend_id;
        self.backends
            .insert((ep, proto), BackendRef { id, refs: 1 });
        self.by_id.insert(id, (ep, proto));
        ops.push(Op::PutBackend {
            id,
            value: Backend {
                addr: addr_of(ep.addr),
                port: ep.port,
                proto: proto.number(),
                flags: if ep.local { BACKEND_F_LOCAL } else { 0 },
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
    /// and returns them in a safe order (see the module documentation). Looks at every
    /// frontend: for a first sync, or after the maps had to be read back.
    pub fn plan(&mut self, desired: &Desired) -> Plan {
        self.deferred.clear();
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|fe| !desired.frontends.contains_key(fe))
            .copied()
            .collect();
        self.plan_frontends(desired, desired.frontends.keys().chain(&gone))
    }

    /// [`Self::plan`] for the frontends in `changed` only (the others are known to be
    /// as desired): what a sync after a change costs is what the change touches.
    /// Frontends left for later by [`Self::plan_new`] are planned too.
    pub fn plan_changes(&mut self, desired: &Desired, changed: &BTreeSet<Frontend>) -> Plan {
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.retain(|fe| !changed.contains(fe));
        let retry: Vec<Frontend> = (self.skipped.keys())
            .filter(|fe| !changed.contains(fe) && !deferred.contains(fe))
            .copied()
            .collect();
        self.plan_frontends(desired, changed.iter().chain(&deferred).chain(&retry))
    }

    /// The sync that completes a first sync made in parts: [`Self::plan_changes`], and
    /// the programmed frontends not desired (an earlier agent's, whose objects are gone)
    /// removed. As [`Self::plan`] would, without diffing again the frontends the parts
    /// programmed.
    pub fn plan_rest(&mut self, desired: &Desired, changed: &BTreeSet<Frontend>) -> Plan {
        let gone: Vec<Frontend> = (self.frontends.keys())
            .filter(|fe| !desired.frontends.contains_key(fe))
            .copied()
            .collect();
        self.deferred.extend(gone);
        self.plan_changes(desired, changed)
    }

    /// A part of a first sync made in parts (the source still reading): plans only the
    /// frontends of `changed` that the maps do not hold yet and that have endpoints (here,
    /// or on other nodes only), with their other-scope twin. Nothing programmed is
    /// removed or changed: the maps may hold the frontends of objects still to be read
    /// (an earlier agent's). A frontend with no endpoint waits, since its slices may come
    /// in a later part: it is not refused in between. The frontends left out wait for
    /// the sync that completes the first sync ([`Self::plan_rest`]).
    pub fn plan_new(&mut self, desired: &Desired, changed: &BTreeSet<Frontend>) -> Plan {
        let ready = |fe: &Frontend| {
            !self.frontends.contains_key(fe)
                && desired
                    .frontends
                    .get(fe)
                    .is_some_and(|s| !s.endpoints.is_empty() || s.no_local)
        };
        let (new, later): (Vec<Frontend>, Vec<Frontend>) = changed.iter().partition(|fe| {
            !self.frontends.contains_key(fe)
                && desired.frontends.contains_key(fe)
                && (ready(fe) || ready(&other_scope(fe)))
        });
        self.deferred.extend(later);
        // Planned now: not again at the end (a part before may have deferred it, its
        // endpoints still to come). A later part that changes it defers it again.
        for fe in &new {
            self.deferred.remove(fe);
        }
        self.plan_frontends(desired, new.iter())
    }

    fn plan_frontends<'a>(
        &mut self,
        desired: &Desired,
        frontends: impl Iterator<Item = &'a Frontend>,
    ) -> Plan {
        let mut steps = Steps::default();
        let mut gone = Vec::new();
        self.freed_in_plan = 0;
        for fe in frontends {
            match desired.frontends.get(fe) {
                Some(state) => self.plan_frontend(fe, state, &mut steps),
                None => gone.push(fe),
            }
        }
        // After every new frontend has its rev-NAT id: an id freed here is not reused
        // in this plan, whose removal of the old entries comes after the new ones.
        for fe in gone {
            self.plan_removal(fe, &mut steps);
        }
        let gc = self.release(&steps.released);
        let Steps {
            ports,
            ports_gone,
            backends,
            revnat,
            ranges,
            slots,
            names,
            headers,
            maglev,
            tails,
            purges,
            removals,
            removed_affinity,
            released: _,
            warnings,
            full,
            left,
        } = steps;
        // Entries no adopted frontend accounts for go first: this plan may write some of
        // the same keys again (slots of a frontend an earlier agent left half grown).
        let stale = std::mem::take(&mut self.stale);
        let groups = vec![
            stale,
            ports,
            backends,
            revnat,
            ranges,
            slots,
            names,
            headers,
            maglev,
            tails,
            purges,
            removals,
            removed_affinity,
            gc,
            ports_gone,
        ];
        Plan {
            groups,
            warnings,
            full,
            left,
        }
    }

    /// One desired frontend: its rev-NAT id, backends, affinity purges, slots and header.
    fn plan_frontend(&mut self, fe: &Frontend, state: &FrontendState, steps: &mut Steps) {
        let endpoints = capped_endpoints(fe, state, &mut steps.warnings);
        if self.keep_out(fe, state, &endpoints, steps) {
            return;
        }
        let old = self.frontends.get(fe).cloned();
        let rev_nat_id = match &old {
            Some(o) => o.rev_nat_id,
            None => match self.new_rev_nat(fe, state, steps) {
                Some(id) => id,
                None => {
                    // Tried again by every plan, like a frontend a full map keeps out.
                    self.skipped.insert(*fe, String::new());
                    return;
                }
            },
        };
        self.skipped.remove(fe);
        let wanted: Vec<u32> = endpoints
            .iter()
            .map(|ep| self.acquire_backend(*ep, fe.proto, &mut steps.backends))
            .collect();
        let old_slots = old.as_ref().map(|o| o.slots.clone()).unwrap_or_default();
        // Old slot contents' references are dropped once every acquire is done, so a
        // backend moving between frontends keeps its id.
        steps
            .released
            .extend(old_slots.iter().map(|id| (*id, fe.proto)));
        let new_slots = stable_slots(&old_slots, &wanted);
        if !state.keep_sockets {
            let staying: BTreeSet<(IpAddr, u16)> =
                endpoints.iter().map(|e| (e.addr, e.port)).collect();
            self.note_left(fe, &old_slots, &staying, steps);
        }
        let timeout = state.affinity_timeout;
        let old_timeout = old.as_ref().map(|o| o.affinity_timeout);
        steps.purge_affinity(rev_nat_id, old_timeout, timeout, &old_slots, &new_slots);
        let no_ranges = BTreeSet::new();
        let old_ranges = old.as_ref().map_or(&no_ranges, |o| &o.source_ranges);
        steps.source_ranges(rev_nat_id, old_ranges, &state.source_ranges);
        for (i, id) in new_slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                steps.slots.push(Op::PutService {
                    key: service_key(fe, i as u16 + 1),
                    value: ServiceValue::slot(*id),
                });
            }
        }
        let name = name_of(state);
        if old.as_ref().is_none_or(|o| o.name != name) {
            steps.names.push(Op::PutName {
                id: rev_nat_id,
                name: Box::new(name),
            });
        }
        let (flags, epoch) = self.header(fe, state, old.as_ref(), rev_nat_id, &new_slots, steps);
        let maglev = self.plan_maglev(fe, state, old.as_ref(), &new_slots, steps);
        for i in new_slots.len()..old_slots.len() {
            steps.tails.push(Op::DelService {
                key: service_key(fe, i as u16 + 1),
            });
        }
        if old.is_none() {
            self.ref_port(fe, steps);
        }
        self.freed_in_plan += old_slots.len().saturating_sub(new_slots.len());
        self.slots_total = self.slots_total + new_slots.len() - old_slots.len();
        self.ranges_total = self.ranges_total + state.source_ranges.len() - old_ranges.len();
        self.frontends.insert(
            *fe,
            ProgFrontend {
                rev_nat_id,
                name,
                affinity_timeout: timeout,
                slots: new_slots,
                source_ranges: state.source_ranges.clone(),
                flags,
                epoch,
                keep_sockets: state.keep_sockets,
                maglev,
            },
        );
    }

    /// Whether a full map keeps `fe` out (or as it was) in this plan; warns once per
    /// different warning.
    fn keep_out(
        &mut self,
        fe: &Frontend,
        state: &FrontendState,
        endpoints: &[Endpoint],
        steps: &mut Steps,
    ) -> bool {
        let Some(full) = self.full_map(fe, endpoints, state.source_ranges.len()) else {
            return false;
        };
        let what = if self.frontends.contains_key(fe) {
            "left as it was"
        } else {
            "not programmed"
        };
        let warning = format!(
            "{} ({fe}): map {} is full ({} entries, {}); {what} until there is room \
             (a pinned map keeps its size: a bigger flag takes `lb-user cleanup` and a restart, which cuts connections)",
            state.service, full.0, full.1, full.2
        );
        if self.skipped.get(fe) != Some(&warning) {
            steps.warnings.push(warning.clone());
            steps.full.push(full.0);
            self.skipped.insert(*fe, warning);
        }
        true
    }

    /// The header of `fe` (written when it is new or any of its fields changes);
    /// returns its flags and affinity generation.
    fn header(
        &mut self,
        fe: &Frontend,
        state: &FrontendState,
        old: Option<&ProgFrontend>,
        rev_nat_id: u16,
        new_slots: &[u32],
        steps: &mut Steps,
    ) -> (u8, u8) {
        let mut flags = 0;
        if !state.source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
        if state.no_local {
            flags |= SVC_F_NO_LOCAL;
        }
        let timeout = state.affinity_timeout;
        // A new frontend, or affinity switched on: a new generation, so that no entry
        // written before (another frontend's under a reused rev-NAT id, or this one's from
        // when affinity was last on) is followed.
        let epoch = match old {
            Some(o) if !(o.affinity_timeout == 0 && timeout != 0) => o.epoch,
            _ => self.next_epoch(),
        };
        let same = old.is_some_and(|o| {
            o.slots.len() == new_slots.len()
                && o.affinity_timeout == timeout
                && o.flags == flags
                && o.epoch == epoch
        });
        if !same {
            steps.headers.push(Op::PutService {
                key: service_key(fe, 0),
                value: ServiceValue {
                    flags,
                    epoch,
                    ..ServiceValue::header(new_slots.len() as u16, rev_nat_id, timeout)
                },
            });
        }
        (flags, epoch)
    }

    /// Notes the backends of `slots` (ids) whose address and port are not `staying`:
    /// they leave the socket-level frontend `fe` (a backend that only changes node keeps
    /// its sockets).
    fn note_left(
        &self,
        fe: &Frontend,
        slots: &[u32],
        staying: &BTreeSet<(IpAddr, u16)>,
        steps: &mut Steps,
    ) {
        if fe.scope != crate::model::Scope::External {
            return; // The packet level's own frontends have no sockets.
        }
        for id in slots {
            if let Some((ep, _)) = self.by_id.get(id)
                && !staying.contains(&(ep.addr, ep.port))
            {
                steps
                    .left
                    .insert(((fe.addr, fe.port), (ep.addr, ep.port), fe.proto.number()));
            }
        }
    }

    /// A new affinity generation (1..=255, round and round; 0 is the one of maps written
    /// before generations existed).
    fn next_epoch(&mut self) -> u8 {
        self.last_epoch = self.last_epoch.checked_add(1).unwrap_or(1);
        self.last_epoch
    }

    /// The map (name, capacity, flag) that programming `fe` with `endpoints` would
    /// overfill, if any. Counts what is programmed; what this plan removes frees room
    /// for the next one.
    fn full_map(
        &self,
        fe: &Frontend,
        endpoints: &[Endpoint],
        ranges_wanted: usize,
    ) -> Option<(&'static str, usize, &'static str)> {
        let cap = &self.capacity;
        let old_slots = self.frontends.get(fe).map(|o| o.slots.len());
        if old_slots.is_none() && self.frontends.len() >= cap.frontends {
            return Some((MAP_REVNAT, cap.frontends, "--max-services"));
        }
        let entries = self.frontends.len() + self.slots_total + self.freed_in_plan;
        let grow = usize::from(old_slots.is_none()) + endpoints.len();
        let shrink = old_slots.unwrap_or(0);
        if grow > shrink && entries + grow - shrink > cap.service_entries {
            return Some((MAP_SERVICES, cap.service_entries, "--max-slots"));
        }
        let ranges = self.frontends.get(fe).map_or(0, |o| o.source_ranges.len());
        if ranges_wanted > ranges && self.ranges_total + ranges_wanted - ranges > cap.source_ranges
        {
            return Some((
                MAP_SOURCE_RANGES,
                cap.source_ranges,
                "loadBalancerSourceRanges",
            ));
        }
        let new_backends = endpoints
            .iter()
            .filter(|ep| !self.backends.contains_key(&(**ep, fe.proto)))
            .count();
        if self.backends.len() + new_backends > cap.backends {
            return Some((MAP_BACKENDS, cap.backends, "--max-backends"));
        }
        None
    }

    /// A rev-NAT id and its entry for a new frontend; `None` (with a warning) when every
    /// id is in use.
    fn new_rev_nat(
        &mut self,
        fe: &Frontend,
        state: &FrontendState,
        steps: &mut Steps,
    ) -> Option<u16> {
        let Some(id) = self.alloc_rev_nat() else {
            if self.skipped.contains_key(fe) {
                return None; // Said when it was first left out.
            }
            steps.warnings.push(format!(
                "{} ({fe}): no free rev-NAT id ({} frontends in use); not programmed",
                state.service,
                u16::MAX
            ));
            return None;
        };
        steps.revnat.push(Op::PutRevNat {
            id,
            value: RevNat {
                addr: addr_of(fe.addr),
                port: fe.port,
                _pad: [0; 2],
            },
        });
        Some(id)
    }

    /// A frontend no longer desired (if programmed): header first, then slots and rev-NAT
    /// entry.
    fn plan_removal(&mut self, fe: &Frontend, steps: &mut Steps) {
        self.skipped.remove(fe);
        let Some(old) = self.frontends.remove(fe) else {
            return;
        };
        self.slots_total -= old.slots.len();
        self.ranges_total -= old.source_ranges.len();
        steps.removals.push(Op::DelService {
            key: service_key(fe, 0),
        });
        if old.maglev.is_some() {
            steps.removals.push(Op::DelMaglev {
                key: service_key(fe, 0),
            });
        }
        for i in 0..old.slots.len() {
            steps.removals.push(Op::DelService {
                key: service_key(fe, i as u16 + 1),
            });
        }
        if !old.keep_sockets {
            self.note_left(fe, &old.slots, &BTreeSet::new(), steps);
        }
        steps.removals.push(Op::DelRevNat { id: old.rev_nat_id });
        steps.removals.push(Op::DelName { id: old.rev_nat_id });
        if old.affinity_timeout != 0 {
            // After the header is gone, so that no connection writes one again.
            steps.removed_affinity.push(Op::PurgeAffinity {
                rev_nat_id: old.rev_nat_id,
                backend_id: None,
            });
        }
        steps.source_ranges(old.rev_nat_id, &old.source_ranges, &BTreeSet::new());
        self.free_rev_nat.push(old.rev_nat_id);
        steps
            .released
            .extend(old.slots.iter().map(|id| (*id, fe.proto)));
        self.unref_port(fe, steps);
    }

    /// Counts a newly programmed frontend on its (address, port, protocol); the first
    /// writes the key, before anything of the frontend's.
    fn ref_port(&mut self, fe: &Frontend, steps: &mut Steps) {
        let key = frontend_port(fe);
        let refs = self.port_refs.entry(key).or_default();
        *refs += 1;
        if *refs == 1 {
            steps.ports.push(Op::PutFrontendPort { key });
        }
    }

    /// Uncounts a removed frontend; the last deletes the key, after everything else.
    fn unref_port(&mut self, fe: &Frontend, steps: &mut Steps) {
        let key = frontend_port(fe);
        if let Some(refs) = self.port_refs.get_mut(&key) {
            *refs -= 1;
            if *refs == 0 {
                self.port_refs.remove(&key);
                steps.ports_gone.push(Op::DelFrontendPort { key });
            }
        }
    }

    /// Drops the `released` references; backends left without any are deleted (the
    /// returned operations come last).
    fn release(&mut self, released: &[(u32, Proto)]) -> Vec<Op> {
        let mut emptied = BTreeSet::new();
        for (id, _) in released {
            if let Some(k) = self.by_id.get(id) {
                let r = self.backends.get_mut(k).expect("indexed");
                r.refs = r.refs.saturating_sub(1);
                if r.refs == 0 {
                    emptied.insert(*id);
                }
            }
        }
        let mut gc = Vec::new();
        for id in emptied {
            let k = self.by_id[&id];
            if self.backends[&k].refs == 0 {
                self.backends.remove(&k);
                self.by_id.remove(&id);
                gc.push(Op::DelBackend { id });
            }
        }
        gc
    }
}

/// The operations of one plan, by the step of the safe order they belong to.
#[derive(Default)]
struct Steps {
    /// 0. The (address, port, protocol) of new frontends, before anything of theirs: the
    ///    packet level looks at nothing else for a packet that is not in that map.
    ports: Vec<Op>,
    /// 1. New backends, and purges of reused rev-NAT ids.
    backends: Vec<Op>,
    /// 2. Per frontend: rev-NAT entry and new source ranges, slots, name, header, slots
    ///    beyond the count; each kind in a list of its own, so that the writes to one
    ///    map come in long runs (batched to the kernel), every frontend's order kept.
    revnat: Vec<Op>,
    ranges: Vec<Op>,
    slots: Vec<Op>,
    names: Vec<Op>,
    headers: Vec<Op>,
    /// Maglev tables, written whole once the backends they name exist (before the
    /// backends they no longer name are deleted, 5.).
    maglev: Vec<Op>,
    tails: Vec<Op>,
    /// 3. Affinity entries of backends that left, or of a changed timeout.
    purges: Vec<Op>,
    /// 4. Frontends that are gone.
    removals: Vec<Op>,
    /// 4b. Affinity entries of the frontends that are gone.
    removed_affinity: Vec<Op>,
    /// 6. Keys no frontend has any more, last.
    ports_gone: Vec<Op>,
    /// Slot references to drop once every frontend is planned (then 5., the unused
    /// backends, is computed).
    released: Vec<(u32, Proto)>,
    warnings: Vec<String>,
    /// The full map, for each frontend left out.
    full: Vec<&'static str>,
    /// See [`Plan::left`].
    left: BTreeSet<Left>,
}

impl Steps {
    /// A frontend's source ranges from `old` to `new`: new ones before its header (which
    /// may turn the check on), gone ones after it (which may have turned it off).
    fn source_ranges(
        &mut self,
        rev_nat_id: u16,
        old: &BTreeSet<(IpAddr, u8)>,
        new: &BTreeSet<(IpAddr, u8)>,
    ) {
        for &(net, len) in new.difference(old) {
            let (addr, prefix) = range_key(net, len);
            self.ranges.push(Op::PutSourceRange {
                rev_nat_id,
                addr,
                prefix,
            });
        }
        for &(net, len) in old.difference(new) {
            let (addr, prefix) = range_key(net, len);
            self.purges.push(Op::DelSourceRange {
                rev_nat_id,
                addr,
                prefix,
            });
        }
    }

    /// The affinity purges a frontend needs: a new affinity frontend may reuse the
    /// rev-NAT id of a removed one, so its entries go before the header exists; a changed
    /// timeout drops all; otherwise the entries of backends that left.
    fn purge_affinity(
        &mut self,
        rev_nat_id: u16,
        old_timeout: Option<u32>,
        timeout: u32,
        old_slots: &[u32],
        new_slots: &[u32],
    ) {
        let all = Op::PurgeAffinity {
            rev_nat_id,
            backend_id: None,
        };
        match old_timeout {
            None if timeout != 0 => self.backends.push(all),
            // Before the new header: an entry written under it is never purged.
            Some(t) if t != timeout => self.backends.push(all),
            Some(_) if timeout != 0 => {
                let kept: BTreeSet<u32> = new_slots.iter().copied().collect();
                let left: BTreeSet<u32> = old_slots
                    .iter()
                    .filter(|id| !kept.contains(id))
                    .copied()
                    .collect();
                self.purges
                    .extend(left.into_iter().map(|id| Op::PurgeAffinity {
                        rev_nat_id,
                        backend_id: Some(id),
                    }));
            }
            _ => {}
        }
    }
}

/// The frontend's endpoints, at most [`MAX_SLOTS`] of them (with a warning beyond).
fn capped_endpoints(
    fe: &Frontend,
    state: &FrontendState,
    warnings: &mut Vec<String>,
) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = state.endpoints.iter().copied().collect();
    if endpoints.len() > usize::from(MAX_SLOTS) {
        warnings.push(format!(
            "{} ({fe}): {} endpoints, only the first {MAX_SLOTS} are used",
            state.service,
            endpoints.len()
        ));
        endpoints.truncate(usize::from(MAX_SLOTS));
    }
    endpoints
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

/// The names map's entry for a frontend: its Service port, kind, policy and whether it
/// keeps its sockets.
fn name_of(state: &FrontendState) -> FrontendName {
    FrontendName {
        kind: state.kind.number(),
        flags: if state.policy_local {
            lb_common::FRONTEND_F_POLICY_LOCAL
        } else {
            0
        } | if state.keep_sockets {
            FRONTEND_F_KEEP_SOCKETS
        } else {
            0
        },
        ..FrontendName::new(&state.service)
    }
}

/// The frontend of the other scope at the same address, port and protocol.
fn other_scope(fe: &Frontend) -> Frontend {
    Frontend {
        scope: match fe.scope {
            Scope::External => Scope::Local,
            Scope::Local => Scope::External,
        },
        ..*fe
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use lb_common::{AffinityKey, AffinityValue};
    use std::sync::Arc;

    use crate::model::Scope;

    fn fe(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last).into(),
            port,
            proto: Proto::Tcp,
            scope: Scope::External,
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
                            kind: Default::default(),
                            policy_local: false,
                            no_local: false,
                            keep_sockets: false,
                            endpoints: backends
                                .iter()
                                .map(|b| Endpoint {
                                    addr: Ipv4Addr::new(10, 244, *b, 2).into(),
                                    port: 8080,
                                    local: false,
                                })
                                .collect(),
                            affinity_timeout: 0,
                            source_ranges: BTreeSet::new(),
                        }
                        .into(),
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
            // The packet level looks for a frontend only where that map says.
            assert!(
                maps.frontend_ports
                    .contains(&frontend_port(&frontend_of(&key).unwrap())),
                "after `{after}`: {key:?} is not in the frontend ports"
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
        for op in plan.ops() {
            maps.apply(op);
            assert_consistent(maps, op);
        }
        plan.ops().cloned().collect()
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
                            local: false,
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
    fn room_a_shrinking_frontend_gives_back_counts_from_the_next_plan() {
        // Its slot deletes come after every write of the plan: a frontend growing in
        // the same plan must not count on them (the map would refuse its writes).
        let mut prog = Programmed::default();
        prog.set_capacity(Capacity {
            frontends: 2,
            service_entries: 8,
            backends: 10,
            source_ranges: 10,
            maglev_table_size: None,
        });
        let mut maps = Snapshot::default();
        sync(
            &mut prog,
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 2, 3, 4, 5]), (fe(2, 80), &[6])]),
        );
        assert_eq!(maps.services.len(), 8, "full");
        let next = desired(&[(fe(1, 80), &[1]), (fe(2, 80), &[6, 7, 8, 9, 5])]);
        let plan = prog.plan(&next);
        for op in plan.ops() {
            maps.apply(op);
        }
        assert_eq!(plan.full, [MAP_SERVICES], "{:?}", plan.warnings);
        assert!(maps.services.len() <= 8, "never more than the map holds");
        // The next plan has the room.
        let plan = prog.plan_changes(&next, &BTreeSet::new());
        for op in plan.ops() {
            maps.apply(op);
        }
        assert!(plan.full.is_empty(), "{:?}", plan.warnings);
        assert_eq!(served(&maps), expected(&next));
    }

    #[test]
    fn a_full_map_keeps_frontends_out_with_a_warning_until_there_is_room() {
        let mut prog = Programmed::default();
        // Two frontends, five header and slot entries, three backends.
        prog.set_capacity(Capacity {
            frontends: 2,
            service_entries: 5,
            backends: 3,
            source_ranges: 10,
            maglev_table_size: None,
        });
        let mut maps = Snapshot::default();
        let apply = |plan: &Plan, maps: &mut Snapshot| {
            for op in plan.ops() {
                maps.apply(op);
            }
        };
        let d = desired(&[(fe(1, 80), &[1, 2]), (fe(2, 80), &[3]), (fe(3, 80), &[1])]);
        let plan = prog.plan(&d);
        apply(&plan, &mut maps);
        assert_eq!(plan.full, [MAP_REVNAT], "{:?}", plan.warnings);
        assert!(
            plan.warnings[0].contains("10.96.0.3:80/TCP): map LB_REVNAT_V2 is full (2 entries, --max-services); not programmed"),
            "{:?}",
            plan.warnings
        );
        assert_eq!(served(&maps).len(), 2);
        assert_eq!(prog.skipped(), 1);

        // A frontend growing past the slots' room is left as it was.
        let mut grown = d.clone();
        Arc::make_mut(grown.frontends.get_mut(&fe(2, 80)).unwrap()).endpoints =
            desired(&[(fe(2, 80), &[3, 4])]).frontends[&fe(2, 80)]
                .endpoints
                .clone();
        let plan = prog.plan_changes(&grown, &BTreeSet::from([fe(2, 80)]));
        apply(&plan, &mut maps);
        // (The frontend still kept out is not warned about again.)
        assert_eq!(plan.full, [MAP_SERVICES], "{:?}", plan.warnings);
        assert!(
            plan.warnings[0].contains("is full (5 entries, --max-slots); left as it was"),
            "{:?}",
            plan.warnings
        );
        assert_eq!(served(&maps)[&fe(2, 80)].len(), 1);

        // Room is made: the next plans program what was left out, with no change asked.
        let mut smaller = grown.clone();
        smaller.frontends.remove(&fe(1, 80));
        let plan = prog.plan_changes(&smaller, &BTreeSet::from([fe(1, 80)]));
        apply(&plan, &mut maps);
        let plan = prog.plan_changes(&smaller, &BTreeSet::new());
        apply(&plan, &mut maps);
        assert!(plan.full.is_empty(), "{:?}", plan.warnings);
        assert_eq!(prog.skipped(), 0);
        assert_eq!(served(&maps), expected(&smaller));
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

    /// `d` with the kinds given to frontends (by address's last octet).
    fn with_kinds(mut d: Desired, kinds: &[(u8, crate::model::FrontendKind)]) -> Desired {
        for (fe, state) in d.frontends.iter_mut() {
            let IpAddr::V4(v4) = fe.addr else { continue };
            if let Some((_, kind)) = kinds.iter().find(|(last, _)| *last == v4.octets()[3]) {
                Arc::make_mut(state).kind = *kind;
            }
        }
        d
    }

    /// Plans `d` with tables of `size` entries and applies it, checking that every table
    /// is written when the backends it names exist; returns the table operations.
    fn maglev_sync(prog: &mut Programmed, maps: &mut Snapshot, d: &Desired) -> Vec<Op> {
        let plan = prog.plan(d);
        let mut tables = Vec::new();
        for op in plan.ops() {
            maps.apply(op);
            match op {
                Op::PutMaglev { spec, .. } => {
                    for (id, _) in &spec.backends {
                        assert!(maps.backends.contains_key(id), "`{op}`: backend {id}");
                    }
                    tables.push(op.clone());
                }
                Op::DelMaglev { .. } => tables.push(op.clone()),
                _ => {}
            }
        }
        for op in plan.ops() {
            if let Op::DelBackend { id } = op {
                assert!(
                    maps.maglev.is_empty()
                        || tables.iter().all(|t| match t {
                            Op::PutMaglev { spec, .. } =>
                                spec.backends.iter().all(|(b, _)| b != id),
                            _ => true,
                        }),
                    "backend {id} deleted while a table names it"
                );
            }
        }
        tables
    }

    #[test]
    fn maglev_tables_go_to_external_frontends_follow_their_backends_and_go_with_them() {
        use crate::model::FrontendKind::{ClusterIp, LoadBalancer, NodePort};
        let local = Frontend {
            scope: Scope::Local,
            ..fe(3, 80)
        };
        let kinds = [
            (1, ClusterIp),
            (2, NodePort),
            (3, LoadBalancer),
            (4, NodePort),
        ];
        let d = |b2: &[u8]| {
            with_kinds(
                desired(&[
                    (fe(1, 80), &[1, 2]),
                    (fe(2, 80), b2),
                    (fe(3, 80), &[1, 2, 3]),
                    (local, &[3]),
                    (fe(4, 80), &[]),
                ]),
                &kinds,
            )
        };
        let mut prog = Programmed::default();
        prog.set_maglev(Some(251));
        let mut maps = Snapshot::default();
        let ops = maglev_sync(&mut prog, &mut maps, &d(&[1, 2]));
        // The nodePort, the LoadBalancer IP in both scopes; not the cluster IP, not the
        // frontend without backends.
        let with_tables: BTreeSet<Frontend> = maps
            .maglev
            .keys()
            .map(|k| frontend_of(k).unwrap())
            .collect();
        assert_eq!(with_tables, BTreeSet::from([fe(2, 80), fe(3, 80), local]));
        assert_eq!(ops.len(), 3);
        assert_eq!(
            prog.maglev_tables(),
            (3, 3 * crate::maglev::table_bytes(251))
        );
        let Some(Op::PutMaglev { spec, .. }) = ops
            .iter()
            .find(|o| matches!(o, Op::PutMaglev { key, .. } if frontend_of(key) == Some(local)))
        else {
            panic!("{ops:?}");
        };
        assert_eq!(spec.backends.len(), 1);
        assert_eq!(spec.size, 251);
        // A backend change rewrites that frontend's table only.
        let before = maps.maglev[&service_key(&fe(2, 80), 0)];
        let ops = maglev_sync(&mut prog, &mut maps, &d(&[1, 2, 3]));
        assert!(
            matches!(&ops[..], [Op::PutMaglev { key, .. }] if *key == service_key(&fe(2, 80), 0)),
            "{ops:?}"
        );
        assert_ne!(maps.maglev[&service_key(&fe(2, 80), 0)], before);
        // No backend left: no table.
        let ops = maglev_sync(&mut prog, &mut maps, &d(&[]));
        assert!(matches!(&ops[..], [Op::DelMaglev { .. }]), "{ops:?}");
        // The frontend gone: its table goes with it.
        let mut gone = d(&[1]);
        maglev_sync(&mut prog, &mut maps, &gone);
        gone.frontends.remove(&fe(2, 80));
        let ops = maglev_sync(&mut prog, &mut maps, &gone);
        assert!(matches!(&ops[..], [Op::DelMaglev { .. }]), "{ops:?}");
        assert_eq!(maps.maglev.len(), 2);
    }

    #[test]
    fn a_restarted_agent_keeps_tables_that_match_and_rebuilds_or_drops_the_others() {
        use crate::model::FrontendKind::LoadBalancer;
        let d = with_kinds(
            desired(&[(fe(1, 80), &[1, 2]), (fe(2, 80), &[2, 3])]),
            &[(1, LoadBalancer), (2, LoadBalancer)],
        );
        let mut prog = Programmed::default();
        prog.set_maglev(Some(251));
        let mut maps = Snapshot::default();
        maglev_sync(&mut prog, &mut maps, &d);
        // A table no frontend has (left by a crash) goes; the others are kept as they are.
        maps.maglev.insert(service_key(&fe(9, 80), 0), (251, 1));
        let mut same = Programmed::adopt(&maps);
        same.set_maglev(Some(251));
        let ops = maglev_sync(&mut same.clone(), &mut maps.clone(), &d);
        assert_eq!(
            ops,
            vec![Op::DelMaglev {
                key: service_key(&fe(9, 80), 0)
            }]
        );
        // Another table size: every table is rebuilt (swapped in whole).
        let mut resized = Programmed::adopt(&maps);
        resized.set_maglev(Some(509));
        let ops = maglev_sync(&mut resized, &mut maps.clone(), &d);
        let sizes: Vec<u32> = ops
            .iter()
            .filter_map(|o| match o {
                Op::PutMaglev { spec, .. } => Some(spec.size),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, vec![509, 509]);
        // Random mode: every table goes.
        let mut random = Programmed::adopt(&maps);
        random.set_maglev(None);
        let ops = maglev_sync(&mut random, &mut maps, &d);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(maps.maglev.is_empty());
        // A periodic read-back keeps the mode.
        let again = random.readopt(&maps);
        assert_eq!(again.capacity.maglev_table_size, None);
        let mut m = Programmed::default();
        m.set_maglev(Some(251));
        assert_eq!(m.readopt(&maps).capacity.maglev_table_size, Some(251));
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
    fn a_stale_name_left_by_a_crash_never_takes_a_new_frontends_name() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(&mut prog, &mut maps, &desired(&[(fe(1, 80), &[1])]));
        // A crash between a frontend's rev-NAT delete and its name delete: id 2's name.
        maps.names.insert(2, FrontendName::new("ns/gone"));
        let mut adopted = Programmed::adopt(&maps);
        let d = desired(&[(fe(1, 80), &[1]), (fe(2, 81), &[1])]);
        sync(&mut adopted, &mut maps, &d);
        // Every frontend has its own name; the stale one is gone.
        let names: BTreeSet<&str> = maps.names.values().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["ns/80", "ns/81"]),
            "{:?}",
            maps.names
        );
        assert_eq!(maps.names.len(), maps.revnat.len());
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
    fn frontend_ports_come_before_their_frontends_and_go_with_the_last() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let port = |last, port| frontend_port(&fe(last, port));
        // Two frontends (external and local scope) on one port, one on another.
        let local = Frontend {
            scope: Scope::Local,
            ..fe(1, 80)
        };
        let d = desired(&[(fe(1, 80), &[1]), (local, &[1]), (fe(2, 80), &[1])]);
        sync(&mut prog, &mut maps, &d);
        assert_eq!(
            maps.frontend_ports,
            BTreeSet::from([port(1, 80), port(2, 80)])
        );
        // One of the two goes: the key stays for the other.
        let d = desired(&[(local, &[1]), (fe(2, 80), &[1])]);
        let ops = sync(&mut prog, &mut maps, &d);
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DelFrontendPort { .. })),
            "{ops:#?}"
        );
        // The last one goes: the key goes, after the frontend's header.
        let d = desired(&[(fe(2, 80), &[1])]);
        let ops = sync(&mut prog, &mut maps, &d);
        let header = pos2(
            &ops,
            |o| matches!(o, Op::DelService { key } if key.slot == 0),
        );
        let gone = pos2(&ops, |o| *o == Op::DelFrontendPort { key: port(1, 80) });
        assert!(header < gone, "{ops:#?}");
        assert_eq!(maps.frontend_ports, BTreeSet::from([port(2, 80)]));
        // Maps of an agent that had no such map: adopting them writes the keys first,
        // and deletes one no frontend has. (Such maps are inconsistent until then: not
        // checked op by op.)
        maps.frontend_ports = BTreeSet::from([port(9, 9)]);
        let mut adopted = Programmed::adopt(&maps);
        let ops: Vec<Op> = adopted.plan(&d).ops().cloned().collect();
        for op in &ops {
            maps.apply(op);
        }
        assert_eq!(maps.frontend_ports, BTreeSet::from([port(2, 80)]));
        assert_eq!(
            ops,
            [
                Op::DelFrontendPort { key: port(9, 9) },
                Op::PutFrontendPort { key: port(2, 80) }
            ]
        );
    }

    #[test]
    fn ids_freed_before_a_restart_are_handed_out_again_after_it() {
        // Most of the rev-NAT id space programmed, then all but the last frontend gone;
        // an agent that adopts those maps programs a new full set in the gaps.
        let many = |from: u32, n: u32| -> Vec<(Frontend, &'static [u8])> {
            (from..from + n)
                .map(|i| {
                    let fe = Frontend {
                        addr: Ipv4Addr::from(0x0a60_0000 + i).into(),
                        ..fe(0, 80)
                    };
                    (fe, &[1u8][..])
                })
                .collect()
        };
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let full = 65_000;
        let first = desired(&many(0, full));
        for op in prog.plan(&first).ops() {
            maps.apply(op);
        }
        let last = desired(&many(full - 1, 1));
        for op in prog.plan(&last).ops() {
            maps.apply(op);
        }
        assert_eq!(maps.revnat.len(), 1);
        let mut adopted = Programmed::adopt(&maps);
        let mut next = many(100_000, full - 1);
        next.extend(many(full - 1, 1));
        let plan = adopted.plan(&desired(&next));
        assert!(
            plan.warnings.is_empty(),
            "{:?}",
            &plan.warnings[..3.min(plan.warnings.len())]
        );
        for op in plan.ops() {
            maps.apply(op);
        }
        assert_eq!(maps.revnat.len(), full as usize, "every frontend got an id");
        assert_eq!(adopted.skipped(), 0);
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
            Arc::make_mut(s).affinity_timeout = timeout;
        }
        d
    }

    #[test]
    fn affinity_generations_and_backend_ids_never_lead_to_another_services_backend() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let header = |maps: &Snapshot| maps.services[&service_key(&fe(1, 80), 0)];
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1, 2])]), 30),
        );
        let first = header(&maps).epoch;
        assert_ne!(first, 0, "a new frontend gets a generation");
        // Backend 2 leaves, backend 3 comes: a new id, never backend 2's.
        let ids_before: BTreeSet<u32> = maps.backends.keys().copied().collect();
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1])]), 30),
        );
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1, 3])]), 30),
        );
        let new_ids: Vec<u32> = maps
            .backends
            .keys()
            .filter(|id| !ids_before.contains(id))
            .copied()
            .collect();
        assert!(
            new_ids.len() == 1 && new_ids[0] > *ids_before.iter().max().unwrap(),
            "{new_ids:?} after {ids_before:?}"
        );
        assert_eq!(
            header(&maps).epoch,
            first,
            "the same frontend keeps its generation"
        );
        // Affinity off, then on again: a new generation, so no entry from before counts.
        sync(&mut prog, &mut maps, &desired(&[(fe(1, 80), &[1, 3])]));
        assert_eq!(header(&maps).epoch, first);
        sync(
            &mut prog,
            &mut maps,
            &with_affinity(desired(&[(fe(1, 80), &[1, 3])]), 30),
        );
        let second = header(&maps).epoch;
        assert_ne!(second, first);
        // A frontend that goes takes its entries with it, after its header.
        remember(&mut maps, &fe(1, 80), 7, 1);
        let ops = sync(&mut prog, &mut maps, &Desired::default());
        let header_gone = ops
            .iter()
            .position(|o| matches!(o, Op::DelService { key } if key.slot == 0))
            .unwrap();
        let purged = ops
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
            .expect("the entries are purged");
        assert!(purged > header_gone, "{ops:?}");
        assert!(maps.affinity.is_empty());
    }

    #[test]
    fn backends_that_leave_are_listed_for_their_sockets_unless_the_service_keeps_them() {
        let mut prog = Programmed::default();
        let backend = |b: u8| (IpAddr::from(Ipv4Addr::new(10, 244, b, 2)), 8080);
        let frontend = (fe(1, 80).addr, 80);
        prog.plan(&desired(&[(fe(1, 80), &[1, 2, 3])]));
        let plan = prog.plan(&desired(&[(fe(1, 80), &[1])]));
        let tcp = lb_common::PROTO_TCP;
        assert_eq!(
            plan.left,
            BTreeSet::from([(frontend, backend(2), tcp), (frontend, backend(3), tcp)])
        );
        let mut keep = desired(&[(fe(1, 80), &[])]);
        Arc::make_mut(keep.frontends.get_mut(&fe(1, 80)).unwrap()).keep_sockets = true;
        assert!(
            prog.plan(&keep).left.is_empty(),
            "the Service keeps its sockets"
        );
        prog.plan(&desired(&[(fe(1, 80), &[4])]));
        let gone = prog.plan(&Desired::default());
        assert_eq!(
            gone.left,
            BTreeSet::from([(frontend, backend(4), tcp)]),
            "a frontend that goes"
        );
    }

    #[test]
    fn a_service_gone_when_the_maps_are_read_back_keeps_its_sockets_if_annotated() {
        // The maps read back (a restart, or after a failed write) and planned against a
        // desired state without the Service: the annotation comes from the names map.
        let mut keep = desired(&[(fe(1, 80), &[1, 2])]);
        Arc::make_mut(keep.frontends.get_mut(&fe(1, 80)).unwrap()).keep_sockets = true;
        let mut maps = Snapshot::default();
        sync(&mut Programmed::default(), &mut maps, &keep);
        assert!(
            Programmed::adopt(&maps).plan(&keep).is_empty(),
            "nothing to repair"
        );
        let gone = Programmed::adopt(&maps).plan(&Desired::default());
        assert!(
            gone.left.is_empty(),
            "the Service kept its sockets: {:?}",
            gone.left
        );
        // Without the annotation, its backends are listed as left.
        let mut maps = Snapshot::default();
        sync(
            &mut Programmed::default(),
            &mut maps,
            &desired(&[(fe(1, 80), &[1, 2])]),
        );
        let gone = Programmed::adopt(&maps).plan(&Desired::default());
        assert_eq!(gone.left.len(), 2, "{:?}", gone.left);
    }

    #[test]
    fn the_keep_sockets_annotation_switched_on_rewrites_the_name() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        sync(&mut prog, &mut maps, &desired(&[(fe(1, 80), &[1])]));
        let mut keep = desired(&[(fe(1, 80), &[1])]);
        Arc::make_mut(keep.frontends.get_mut(&fe(1, 80)).unwrap()).keep_sockets = true;
        let ops = sync(&mut prog, &mut maps, &keep);
        assert!(
            matches!(ops.as_slice(), [Op::PutName { name, .. }] if name.flags & FRONTEND_F_KEEP_SOCKETS != 0),
            "{ops:?}"
        );
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
                epoch: header.epoch,
                _pad: [0; 3],
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
            scope: Scope::External,
        };
        let ep = Endpoint {
            addr: "fd00:244:1::2".parse().unwrap(),
            port: 8443,
            local: false,
        };
        let mut d = desired(&[(fe(1, 443), &[1])]);
        d.frontends.insert(
            v6,
            FrontendState {
                service: "ns/dual".into(),
                kind: Default::default(),
                policy_local: false,
                no_local: false,
                keep_sockets: false,
                endpoints: [ep].into(),
                affinity_timeout: 0,
                source_ranges: BTreeSet::new(),
            }
            .into(),
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

    #[test]
    fn source_ranges_exist_before_the_header_checks_them_and_go_after() {
        let mut prog = Programmed::default();
        let mut maps = Snapshot::default();
        let lb = fe(20, 80);
        let mut d = desired(&[(lb, &[1, 2])]);
        let ranges: BTreeSet<(IpAddr, u8)> = [
            ("192.168.77.0".parse().unwrap(), 24),
            ("fd00::".parse().unwrap(), 64),
        ]
        .into();
        Arc::make_mut(d.frontends.get_mut(&lb).unwrap()).source_ranges = ranges.clone();
        let ops = sync(&mut prog, &mut maps, &d);
        let pos = |want: &dyn Fn(&Op) -> bool| ops.iter().position(want).unwrap();
        let header = pos(&|o| matches!(o, Op::PutService { key, .. } if key.slot == 0));
        let first_range = pos(&|o| matches!(o, Op::PutSourceRange { .. }));
        assert!(first_range < header, "{ops:#?}");
        let header_value = maps.services[&service_key(&lb, 0)];
        assert_eq!(header_value.flags, SVC_F_SOURCE_RANGES);
        let ipv4_range = (
            header_value.rev_nat_id,
            addr_of("192.168.77.0".parse().unwrap()),
            120,
        );
        assert!(
            maps.source_ranges.contains(&ipv4_range),
            "{:?}",
            maps.source_ranges
        );
        assert_eq!(maps.source_ranges.len(), 2);
        // A restarted agent adopts them: nothing to write.
        let mut adopted = Programmed::adopt(&maps);
        assert!(adopted.plan(&d).is_empty());
        // Dropped: the header loses the flag first, then the ranges go.
        Arc::make_mut(d.frontends.get_mut(&lb).unwrap())
            .source_ranges
            .clear();
        let ops = sync(&mut prog, &mut maps, &d);
        let header = pos2(
            &ops,
            |o| matches!(o, Op::PutService { key, .. } if key.slot == 0),
        );
        let first_del = pos2(&ops, |o| matches!(o, Op::DelSourceRange { .. }));
        assert!(header < first_del, "{ops:#?}");
        assert_eq!(maps.services[&service_key(&lb, 0)].flags, 0);
        assert!(maps.source_ranges.is_empty());
        // A removed frontend takes its ranges along.
        Arc::make_mut(d.frontends.get_mut(&lb).unwrap()).source_ranges = ranges;
        sync(&mut prog, &mut maps, &d);
        sync(&mut prog, &mut maps, &Desired::default());
        assert!(maps.source_ranges.is_empty() && maps.services.is_empty());
    }

    fn pos2(ops: &[Op], want: impl Fn(&Op) -> bool) -> usize {
        ops.iter().position(want).unwrap()
    }

    #[test]
    fn a_part_of_a_first_sync_adds_new_frontends_with_endpoints_and_removes_nothing() {
        // What an earlier agent left: fe 1 over backend 1, fe 4 (its object not read yet).
        let mut maps = Snapshot::default();
        let mut earlier = Programmed::default();
        sync(
            &mut earlier,
            &mut maps,
            &desired(&[(fe(1, 80), &[1]), (fe(4, 80), &[4])]),
        );
        let mut prog = Programmed::adopt(&maps);
        // The first part: fe 1 changed, fe 2 new with an endpoint, fe 3 new with none yet.
        let part = desired(&[(fe(1, 80), &[2]), (fe(2, 80), &[3]), (fe(3, 80), &[])]);
        let changed: BTreeSet<Frontend> = part.frontends.keys().copied().collect();
        let plan = prog.plan_new(&part, &changed);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        for op in plan.ops() {
            maps.apply(op);
            assert_consistent(&maps, op);
        }
        let ip = |b: u8| Endpoint {
            addr: Ipv4Addr::new(10, 244, b, 2).into(),
            port: 8080,
            local: false,
        };
        let served_now = served(&maps);
        // fe 2 is served; fe 1 and fe 4 stay as the maps held them; fe 3 is not refused.
        assert_eq!(served_now[&fe(2, 80)], BTreeSet::from([ip(3)]));
        assert_eq!(served_now[&fe(1, 80)], BTreeSet::from([ip(1)]));
        assert_eq!(served_now[&fe(4, 80)], BTreeSet::from([ip(4)]));
        assert!(!served_now.contains_key(&fe(3, 80)), "{served_now:?}");
        // A second part brings fe 3's endpoint: it is added, still nothing removed.
        let more = desired(&[(fe(1, 80), &[2]), (fe(2, 80), &[3]), (fe(3, 80), &[5])]);
        let plan = prog.plan_new(&more, &BTreeSet::from([fe(3, 80)]));
        plan.ops().for_each(|op| maps.apply(op));
        assert_eq!(served(&maps)[&fe(3, 80)], BTreeSet::from([ip(5)]));
        assert!(served(&maps).contains_key(&fe(4, 80)));
        // Left for the end: fe 1 (programmed, changed), not fe 3 (planned by this part).
        assert_eq!(prog.deferred, BTreeSet::from([fe(1, 80)]));
        // The sync that completes it plans what the parts left: fe 1 moves, fe 4 goes.
        let plan = prog.plan_rest(&more, &BTreeSet::new());
        plan.ops().for_each(|op| {
            maps.apply(op);
            assert_consistent(&maps, op);
        });
        assert_eq!(served(&maps), expected(&more));
        assert!(prog.plan(&more).is_empty(), "nothing left to do");
    }
}
