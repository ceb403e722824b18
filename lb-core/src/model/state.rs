//! The incremental model: the objects a source reported, and the desired state kept up
//! to date service by service.
//!
//! A source reports [`Change`]s; [`Model::apply`] files each object (shared, never
//! copied) and marks the services it touches. [`Model::update`] then recomputes those
//! services only and reports which frontends changed, so a sync costs what the change
//! costs, not what the cluster holds. A change to this node's zone or addresses
//! recomputes every service (rare: they are what every frontend depends on).
//!
//! Two services may claim one frontend (an externalIP, say), the CVE-2020-8554 pattern.
//! The claims are ranked ([`Claim`]): a ClusterIP beats an externalIP, LoadBalancer IP or
//! nodePort; among equal ones the claim made in an earlier update (the one programmed
//! first) keeps the frontend, then the older creationTimestamp, then namespace/name.
//! Every other claimant gets a warning and is counted ([`Model::conflicts`]); when the
//! winner lets go, the next claimant takes over.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};

use super::{
    Desired, Frontend, FrontendKind, FrontendState, HealthCheck, NodeInfo, Objects,
    SERVICE_NAME_LABEL, Scope, Slice,
    service::{ServiceOut, add_service},
    vecmap::VecMap,
};

/// (namespace, name); a Node's namespace is empty.
pub type ObjKey = (String, String);

/// Which kind of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// One object as a source holds it (shared, not copied).
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<Slice>),
    Node(Arc<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Node(_) => Kind::Node,
        }
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
        }
    }

    /// (kind, namespace, name), borrowed: what [`Self::key`] gives, without copies.
    pub fn id(&self) -> (Kind, &str, &str) {
        let meta = self.meta();
        let ns = match self {
            Self::Node(_) => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        (self.kind(), ns, meta.name.as_deref().unwrap_or("<no name>"))
    }

    /// (namespace, name): the namespace defaults to "default" (none for a Node).
    pub fn key(&self) -> ObjKey {
        let (_, ns, name) = self.id();
        (ns.to_string(), name.to_string())
    }

    /// Labelled to be left to another proxy, or headless ([`super::not_ours`]).
    fn not_ours(&self) -> bool {
        match self {
            Self::Service(o) => super::not_ours(o.metadata.labels.as_ref()),
            Self::EndpointSlice(o) => o.is_not_ours(),
            Self::Node(_) => false,
        }
    }

    /// The same object as far as the model is concerned: the same resourceVersion when
    /// both have one (the API's objects), else equal content (manifests).
    fn same_as(&self, other: &Self) -> bool {
        let (a, b) = (self.meta(), other.meta());
        if a.resource_version.is_some() && a.resource_version == b.resource_version {
            return a.uid == b.uid;
        }
        match (self, other) {
            (Self::Service(a), Self::Service(b)) => Arc::ptr_eq(a, b) || a == b,
            (Self::EndpointSlice(a), Self::EndpointSlice(b)) => Arc::ptr_eq(a, b) || a == b,
            (Self::Node(a), Self::Node(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum Change {
    /// Added or modified.
    Apply(Object),
    Delete(Kind, ObjKey),
    /// A complete list of one kind: what it lacks is gone.
    Relist(Kind, Vec<Object>),
}

/// What one [`Model::update`] changed.
#[derive(Debug, Default)]
pub struct Update {
    /// Frontends whose desired state changed (added, modified or removed).
    pub changed: BTreeSet<Frontend>,
    /// The health-check ports or what they report changed.
    pub health_changed: bool,
    /// Services recomputed.
    pub services: usize,
    /// EndpointSlices (namespace/name) whose last-change-trigger-time annotation changed,
    /// with the new value; empty for the first update (nothing was programmed before).
    pub triggers: Vec<(String, String)>,
}

pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The objects and the desired state derived from them.
#[derive(Debug)]
pub struct Model {
    node_name: Option<String>,
    node_ips: Vec<IpAddr>,
    node: NodeInfo,

    services: BTreeMap<ObjKey, Arc<Service>>,
    slices: BTreeMap<ObjKey, Arc<Slice>>,
    /// Service -> the slices labelled with its name.
    slices_of: BTreeMap<ObjKey, VecMap<ObjKey, ()>>,
    nodes: BTreeMap<String, Arc<Node>>,
    /// Slices without the service-name label, with their warning.
    unlabeled: BTreeMap<ObjKey, String>,

    /// Services (by key) to recompute at the next update.
    dirty: BTreeSet<ObjKey>,
    node_dirty: bool,
    triggers: Vec<(String, String)>,
    seeded: bool,

    /// Each service's frontends, health check and warnings, as computed alone.
    outs: BTreeMap<ObjKey, ServiceOut>,
    /// Keys whose out has warnings.
    warned: BTreeSet<ObjKey>,
    /// Frontend -> the services that claim it (the lowest [`Claim`] wins).
    claims: BTreeMap<Frontend, VecMap<ObjKey, Claim>>,
    health_claims: BTreeMap<u16, VecMap<ObjKey, Claim>>,
    /// Counts the updates: the `since` of the claims each one makes.
    generation: u64,
    served: usize,

    desired: Desired,
    health_checks: BTreeMap<u16, HealthCheck>,
}

impl Model {
    /// An empty model for the node `node_name` (None: no node context, so
    /// internalTrafficPolicy Local services get no endpoints and no topology);
    /// `node_ips` are the node addresses for nodePorts, empty meaning the Node object's.
    pub fn new(node_name: Option<String>, node_ips: Vec<IpAddr>) -> Self {
        let node = NodeInfo::of(node_name.as_deref(), &node_ips, None);
        Self {
            node_name,
            node_ips,
            node,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            nodes: BTreeMap::new(),
            unlabeled: BTreeMap::new(),
            dirty: BTreeSet::new(),
            node_dirty: true,
            triggers: Vec::new(),
            seeded: false,
            outs: BTreeMap::new(),
            warned: BTreeSet::new(),
            claims: BTreeMap::new(),
            health_claims: BTreeMap::new(),
            generation: 0,
            served: 0,
            desired: Desired::default(),
            health_checks: BTreeMap::new(),
        }
    }

    /// Files one change; the services it touches are recomputed by the next update.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Apply(obj) => self.upsert(obj),
            Change::Delete(kind, key) => self.delete(kind, &key),
            Change::Relist(kind, list) => {
                let listed: BTreeSet<ObjKey> = list.iter().map(Object::key).collect();
                for key in self.keys(kind) {
                    if !listed.contains(&key) {
                        self.delete(kind, &key);
                    }
                }
                for obj in list {
                    self.upsert(obj);
                }
            }
        }
    }

    /// Replaces every object with `objects` (a full set, as a one-shot source gives);
    /// returns a warning per object defined more than once (the first is kept).
    pub fn replace(&mut self, objects: Objects) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut lists: BTreeMap<Kind, BTreeMap<ObjKey, Object>> = BTreeMap::new();
        let all = (objects
            .services
            .into_iter()
            .map(|o| Object::Service(Arc::new(o))))
        .chain(
            objects
                .slices
                .into_iter()
                .map(|o| Object::EndpointSlice(Arc::new(o.slim()))),
        )
        .chain(objects.nodes.into_iter().map(|o| Object::Node(Arc::new(o))));
        for obj in all {
            let (kind, key) = (obj.kind(), obj.key());
            match lists.entry(kind).or_default().entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    warnings.push(duplicate_warning(kind, e.key()));
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(obj);
                }
            }
        }
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
            let list = lists.remove(&kind).unwrap_or_default();
            self.apply(Change::Relist(kind, list.into_values().collect()));
        }
        warnings
    }

    fn keys(&self, kind: Kind) -> Vec<ObjKey> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
        }
    }

    /// The object of `kind` held under `key`, if any.
    fn held(&self, kind: Kind, key: &ObjKey) -> Option<Object> {
        match kind {
            Kind::Service => self.services.get(key).cloned().map(Object::Service),
            Kind::EndpointSlice => self.slices.get(key).cloned().map(Object::EndpointSlice),
            Kind::Node => self.nodes.get(&key.1).cloned().map(Object::Node),
        }
    }

    fn upsert(&mut self, obj: Object) {
        let key = obj.key();
        if obj.not_ours() {
            tracing::debug!(
                "{:?} {}/{}: labelled for another proxy or headless; not served",
                obj.kind(),
                key.0,
                key.1
            );
            self.delete(obj.kind(), &key);
            return;
        }
        if self
            .held(obj.kind(), &key)
            .is_some_and(|old| old.same_as(&obj))
        {
            return;
        }
        match obj {
            Object::Service(svc) => {
                self.services.insert(key.clone(), svc);
                self.dirty.insert(key);
            }
            Object::EndpointSlice(slice) => {
                let old = self.slices.get(&key).cloned();
                let trigger = slice.trigger_time();
                if self.seeded
                    && let Some(t) = trigger
                    && old.as_deref().and_then(Slice::trigger_time) != Some(t)
                {
                    self.triggers
                        .push((format!("{}/{}", key.0, key.1), t.to_string()));
                }
                self.unlink_slice(&key);
                match owner_of(&slice, &key) {
                    Ok(owner) => {
                        self.slices_of
                            .entry(owner.clone())
                            .or_default()
                            .insert(key.clone(), ());
                        self.dirty.insert(owner);
                    }
                    Err(warning) => {
                        self.unlabeled.insert(key.clone(), warning);
                    }
                }
                self.slices.insert(key, slice);
            }
            Object::Node(node) => {
                let name = key.1;
                self.node_dirty |= self.node_name.as_deref() == Some(name.as_str());
                self.nodes.insert(name, node);
            }
        }
    }

    fn delete(&mut self, kind: Kind, key: &ObjKey) {
        match kind {
            Kind::Service => {
                if self.services.remove(key).is_some() {
                    self.dirty.insert(key.clone());
                }
            }
            Kind::EndpointSlice => {
                self.unlink_slice(key);
                self.slices.remove(key);
            }
            Kind::Node => {
                if self.nodes.remove(&key.1).is_some() {
                    self.node_dirty |= self.node_name.as_deref() == Some(key.1.as_str());
                }
            }
        }
    }

    /// Takes slice `key` out of its service's list (marking that service).
    fn unlink_slice(&mut self, key: &ObjKey) {
        self.unlabeled.remove(key);
        let Some(old) = self.slices.get(key) else {
            return;
        };
        let Ok(owner) = owner_of(old, key) else {
            return;
        };
        if let Some(set) = self.slices_of.get_mut(&owner) {
            set.remove(key);
            if set.is_empty() {
                self.slices_of.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Recomputes the marked services; returns what changed.
    pub fn update(&mut self) -> Update {
        if std::mem::take(&mut self.node_dirty) {
            let node = self.node_name.as_deref().and_then(|n| self.nodes.get(n));
            let info = NodeInfo::of(
                self.node_name.as_deref(),
                &self.node_ips,
                node.map(|n| &**n),
            );
            if info != self.node {
                self.node = info;
                // Every service depends on the node's zone and addresses.
                self.dirty.extend(self.services.keys().cloned());
                self.dirty.extend(self.outs.keys().cloned());
            }
        }
        self.generation += 1;
        let dirty = std::mem::take(&mut self.dirty);
        let mut touched = BTreeSet::new();
        let mut touched_ports = BTreeSet::new();
        for key in &dirty {
            self.recompute(key, &mut touched, &mut touched_ports);
        }
        // A frontend and its Local-scope twin go together (the twin belongs to whoever
        // wins the frontend).
        let twins: Vec<Frontend> = touched.iter().map(twin).collect();
        touched.extend(twins);
        let mut changed = BTreeSet::new();
        for fe in touched {
            let now = self.winner_state(&fe).cloned();
            let before = match now {
                Some(state) => self.desired.frontends.insert(fe, state),
                None => self.desired.frontends.remove(&fe),
            };
            if before.as_ref() != self.desired.frontends.get(&fe) {
                changed.insert(fe);
            }
        }
        let mut health_changed = false;
        for port in touched_ports {
            let now = self
                .health_claims
                .get(&port)
                .and_then(winner)
                .and_then(|k| self.outs.get(k))
                .and_then(|o| o.health.as_ref())
                .map(|(_, hc)| hc.clone());
            let before = match now {
                Some(hc) => self.health_checks.insert(port, hc),
                None => self.health_checks.remove(&port),
            };
            health_changed |= before.as_ref() != self.health_checks.get(&port);
        }
        let triggers = if self.seeded {
            std::mem::take(&mut self.triggers)
        } else {
            Vec::new()
        };
        self.seeded = true;
        Update {
            changed,
            health_changed,
            services: dirty.len(),
            triggers,
        }
    }

    /// The state of `fe` from the service whose claim wins it; a Local-scope frontend
    /// is its external twin's winner's (or nobody's).
    fn winner_state(&self, fe: &Frontend) -> Option<&Arc<FrontendState>> {
        let external = Frontend {
            scope: Scope::External,
            ..*fe
        };
        let owner = winner(self.claims.get(&external)?)?;
        self.outs.get(owner)?.frontends.get(fe).map(|(s, _)| s)
    }

    /// One service computed alone; its claims replace the old ones. The frontends and
    /// health-check ports it claimed or claims go to `touched`.
    fn recompute(
        &mut self,
        key: &ObjKey,
        touched: &mut BTreeSet<Frontend>,
        touched_ports: &mut BTreeSet<u16>,
    ) {
        // When each frontend and health-check port still claimed was first claimed.
        let mut since: BTreeMap<Frontend, u64> = BTreeMap::new();
        let mut health_since = None;
        if let Some(old) = self.outs.remove(key) {
            if !old.frontends.is_empty() {
                self.served -= 1;
            }
            for fe in old.frontends.keys() {
                if let Some(c) = unclaim(&mut self.claims, fe, key) {
                    since.insert(*fe, c.since);
                }
                touched.insert(*fe);
            }
            if let Some((port, _)) = old.health {
                health_since =
                    unclaim(&mut self.health_claims, &port, key).map(|c| (port, c.since));
                touched_ports.insert(port);
            }
        }
        self.warned.remove(key);
        let name = format!("{}/{}", key.0, key.1);
        let slices: Vec<&Slice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flat_map(VecMap::keys)
            .filter_map(|k| self.slices.get(k).map(|s| &**s))
            .collect();
        let mut out = ServiceOut::default();
        match self.services.get(key) {
            Some(svc) => add_service(svc, &name, &slices, &self.node, &mut out),
            None if slices.is_empty() => return,
            None => {
                for slice in &slices {
                    out.warnings.push(format!(
                        "EndpointSlice {}: field metadata.labels[{SERVICE_NAME_LABEL}]: service {name} does not exist (yet); skipped",
                        super::ns_name(&slice.metadata)
                    ));
                }
            }
        }
        let created = self
            .services
            .get(key)
            .and_then(|s| s.metadata.creation_timestamp.as_ref())
            .map_or(i64::MAX, |t| t.0.as_second());
        for (fe, (state, _)) in out.frontends.iter() {
            let claim = Claim {
                rank: u8::from(state.kind != FrontendKind::ClusterIp),
                since: since.get(fe).copied().unwrap_or(self.generation),
                created,
            };
            self.claims
                .entry(*fe)
                .or_default()
                .insert(key.clone(), claim);
            touched.insert(*fe);
        }
        if let Some((port, _)) = &out.health {
            let claim = Claim {
                rank: 0,
                since: health_since
                    .filter(|(p, _)| p == port)
                    .map_or(self.generation, |(_, s)| s),
                created,
            };
            self.health_claims
                .entry(*port)
                .or_default()
                .insert(key.clone(), claim);
            touched_ports.insert(*port);
        }
        if !out.frontends.is_empty() {
            self.served += 1;
        }
        if !out.warnings.is_empty() {
            self.warned.insert(key.clone());
        }
        self.outs.insert(key.clone(), out);
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.health_checks
    }

    /// This node's addresses (`--node-ip`, else the Node object's).
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node.addresses
    }

    /// Services with at least one frontend.
    pub fn service_count(&self) -> usize {
        self.served
    }

    /// A warning for every object or field skipped, in a stable order.
    pub fn warnings(&self) -> Vec<String> {
        self.filed_warnings().into_iter().map(|(_, w)| w).collect()
    }

    /// [`Self::warnings`], each after where `origin` says its object is defined (the
    /// manifest source's "FILE, document N"), when it knows.
    pub fn located_warnings(
        &self,
        origin: impl Fn(Kind, &ObjKey) -> Option<String>,
    ) -> Vec<String> {
        self.filed_warnings()
            .into_iter()
            .map(|((kind, key), w)| match origin(kind, key) {
                Some(o) => format!("{o}: {w}"),
                None => w,
            })
            .collect()
    }

    /// The warnings, each with the object it is filed under (a Service's own, its
    /// slices' and its claims' under the Service; an unlabeled slice's under the slice).
    fn filed_warnings(&self) -> Vec<((Kind, &ObjKey), String)> {
        let mut out: Vec<((Kind, &ObjKey), String)> = self
            .unlabeled
            .iter()
            .map(|(k, w)| ((Kind::EndpointSlice, k), w.clone()))
            .collect();
        for key in &self.warned {
            let filed = (Kind::Service, key);
            out.extend(self.outs[key].warnings.iter().map(|w| (filed, w.clone())));
        }
        for (fe, owners) in self.contested() {
            let won = winner(owners).expect("claimed");
            let kind = |k: &ObjKey| {
                let (state, index) = self.outs[k]
                    .frontends
                    .get(fe)
                    .expect("a claimant's frontend");
                (FrontendKind::name_of(state.kind.number()), *index)
            };
            for (loser, claim) in owners.iter().filter(|(k, _)| *k != won) {
                let ((lost_kind, index), (won_kind, _)) = (kind(loser), kind(won));
                out.push(((Kind::Service, loser), format!(
                    "Service {}/{}: field spec.ports[{index}]: frontend {fe} ({lost_kind}) is already used by {}/{} (its {won_kind}, {}); skipped",
                    loser.0,
                    loser.1,
                    won.0,
                    won.1,
                    why(owners.get(won).expect("claimed"), claim),
                )));
            }
        }
        for (port, owners) in self.health_claims.iter().filter(|(_, o)| o.len() > 1) {
            let won = winner(owners).expect("more than one");
            for loser in owners.keys().filter(|k| *k != won) {
                out.push(((Kind::Service, loser), format!(
                    "Service {}/{}: field spec.healthCheckNodePort: {port} is already served for {}/{}; skipped",
                    loser.0, loser.1, won.0, won.1
                )));
            }
        }
        out
    }

    /// The frontends that more than one service claims (their external scope only: a
    /// Local-scope twin goes with it), with the claimants.
    fn contested(&self) -> impl Iterator<Item = (&Frontend, &VecMap<ObjKey, Claim>)> {
        self.claims
            .iter()
            .filter(|(fe, o)| o.len() > 1 && fe.scope == Scope::External)
    }

    /// The claims that lost their frontend or health-check port to another service's
    /// (`lb_frontend_conflicts`).
    pub fn conflicts(&self) -> usize {
        let lost = |o: &VecMap<ObjKey, Claim>| o.len().saturating_sub(1);
        self.contested().map(|(_, o)| lost(o)).sum::<usize>()
            + self.health_claims.values().map(lost).sum::<usize>()
    }

    /// The frontends in [`Self::contested`] (for the property tests, whose full rebuild
    /// has no history to rank claims by).
    #[cfg(test)]
    pub(crate) fn contested_frontends(&self) -> BTreeSet<Frontend> {
        self.contested()
            .flat_map(|(fe, _)| [*fe, twin(fe)])
            .collect()
    }

    /// The health-check ports more than one service claims.
    #[cfg(test)]
    pub(crate) fn contested_ports(&self) -> BTreeSet<u16> {
        self.health_claims
            .iter()
            .filter(|(_, o)| o.len() > 1)
            .map(|(p, _)| *p)
            .collect()
    }

    /// A copy of the objects held (for tests and debugging).
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.values().map(|o| (**o).clone()).collect(),
            slices: self.slices.values().map(|o| (**o).clone()).collect(),
            nodes: self.nodes.values().map(|o| (**o).clone()).collect(),
        }
    }
}

/// The frontend of the other scope at the same address, port and protocol.
fn twin(fe: &Frontend) -> Frontend {
    Frontend {
        scope: match fe.scope {
            Scope::External => Scope::Local,
            Scope::Local => Scope::External,
        },
        ..*fe
    }
}

/// One service's claim on a frontend or a health-check port; the lowest wins (then the
/// lowest namespace/name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    /// 0 for a ClusterIP (and a health-check port), 1 for an externalIP, LoadBalancer IP
    /// or nodePort: no Service takes another's ClusterIP with one of those.
    rank: u8,
    /// The update in which this service first claimed it: a holder keeps it against
    /// later claims; claims made in one update (a first list) are equal here.
    since: u64,
    /// The service's metadata.creationTimestamp in seconds (unset: last).
    created: i64,
}

/// Why the claim `won` beat `lost`, for the loser's warning.
fn why(won: &Claim, lost: &Claim) -> &'static str {
    if won.rank < lost.rank {
        "a ClusterIP, which no other kind of address may take"
    } else if won.since < lost.since {
        "held before this claim was made"
    } else if won.created < lost.created {
        "the older Service"
    } else {
        "first by namespace/name"
    }
}

/// The claimant whose claim wins.
fn winner(owners: &VecMap<ObjKey, Claim>) -> Option<&ObjKey> {
    owners.iter().min_by_key(|(k, c)| (**c, *k)).map(|(k, _)| k)
}

/// Withdraws `key`'s claim on `what`; returns it.
fn unclaim<K: Ord>(
    claims: &mut BTreeMap<K, VecMap<ObjKey, Claim>>,
    what: &K,
    key: &ObjKey,
) -> Option<Claim> {
    let owners = claims.get_mut(what)?;
    let claim = owners.remove(key);
    if owners.is_empty() {
        claims.remove(what);
    }
    claim
}

/// The service (namespace, name) a slice belongs to, from its label.
fn owner_of(slice: &Slice, key: &ObjKey) -> Result<ObjKey, String> {
    match slice.service_name() {
        Some(svc) => Ok((key.0.clone(), svc.to_string())),
        None => Err(format!(
            "EndpointSlice {}/{}: field metadata.labels: no {SERVICE_NAME_LABEL} label; skipped",
            key.0, key.1
        )),
    }
}

/// "Service ns/name: defined more than once; the first definition is used".
pub fn duplicate_warning(kind: Kind, key: &ObjKey) -> String {
    let what = match kind {
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::Node => "Node",
    };
    if key.0.is_empty() {
        format!(
            "{what} {}: defined more than once; the first definition is used",
            key.1
        )
    } else {
        format!(
            "{what} {}/{}: defined more than once; the first definition is used",
            key.0, key.1
        )
    }
}
