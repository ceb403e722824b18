//! Map operations and the maps' contents as plain data (no BPF here).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    Addr, AffinityKey, AffinityValue, Backend, FrontendName, FrontendPort, MAP_AFFINITY,
    MAP_BACKENDS, MAP_FRONTEND_PORTS, MAP_MAGLEV, MAP_NAMES, MAP_REVNAT, MAP_SERVICES,
    MAP_SOURCE_RANGES, RevNat, ServiceKey, ServiceValue,
};

use crate::model::{Frontend, Proto, Scope};

/// One map write. Small (the name is boxed): a first sync at 10k services plans a
/// quarter of a million of them.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// The Service port a frontend (by rev-NAT id) belongs to, for `lb-user dump`.
    PutName {
        id: u16,
        name: Box<FrontendName>,
    },
    DelName {
        id: u16,
    },
    /// Deletes the affinity entries of a frontend: all, or those naming one backend.
    PurgeAffinity {
        rev_nat_id: u16,
        backend_id: Option<u32>,
    },
    /// A source range of a frontend (`prefix` bits of the 128-bit mapped address).
    PutSourceRange {
        rev_nat_id: u16,
        addr: Addr,
        prefix: u8,
    },
    DelSourceRange {
        rev_nat_id: u16,
        addr: Addr,
        prefix: u8,
    },
    /// An address, port and protocol that some frontend has (the packet level's first
    /// check).
    PutFrontendPort {
        key: FrontendPort,
    },
    DelFrontendPort {
        key: FrontendPort,
    },
    /// A frontend's Maglev table (key: its header key), written whole and swapped in at
    /// once.
    PutMaglev {
        key: ServiceKey,
        spec: Box<crate::maglev::Spec>,
    },
    DelMaglev {
        key: ServiceKey,
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
            Self::PutName { id, name } => {
                write!(f, "{MAP_NAMES}: write rev-NAT {id} = {}", name.as_str())
            }
            Self::DelName { id } => write!(f, "{MAP_NAMES}: delete rev-NAT {id}"),
            Self::PurgeAffinity {
                rev_nat_id,
                backend_id: None,
            } => write!(f, "{MAP_AFFINITY}: purge rev-NAT {rev_nat_id}"),
            Self::PurgeAffinity {
                rev_nat_id,
                backend_id: Some(b),
            } => write!(f, "{MAP_AFFINITY}: purge rev-NAT {rev_nat_id} backend {b}"),
            Self::PutSourceRange {
                rev_nat_id,
                addr,
                prefix,
            } => fmt_range(f, "write", *rev_nat_id, addr, *prefix),
            Self::DelSourceRange {
                rev_nat_id,
                addr,
                prefix,
            } => fmt_range(f, "delete", *rev_nat_id, addr, *prefix),
            Self::PutFrontendPort { key } => {
                write!(f, "{MAP_FRONTEND_PORTS}: write {}", fmt_frontend_port(key))
            }
            Self::DelFrontendPort { key } => {
                write!(f, "{MAP_FRONTEND_PORTS}: delete {}", fmt_frontend_port(key))
            }
            Self::PutMaglev { key, spec } => write!(
                f,
                "{MAP_MAGLEV}: write the table of {} ({} backends, {} entries)",
                frontend_of(key).map_or("?".into(), |fe| fe.to_string()),
                spec.backends.len(),
                spec.size
            ),
            Self::DelMaglev { key } => write!(
                f,
                "{MAP_MAGLEV}: delete the table of {}",
                frontend_of(key).map_or("?".into(), |fe| fe.to_string())
            ),
        }
    }
}

/// "addr:port/PROTO" of a frontend-ports key.
fn fmt_frontend_port(key: &FrontendPort) -> String {
    let proto = Proto::from_number(key.proto).map_or("?".into(), |p| format!("{p:?}"));
    format!(
        "{}/{}",
        SocketAddr::new(ip_of(&key.addr), key.port),
        proto.to_uppercase()
    )
}

/// The frontend-ports key of a frontend (its scope aside).
pub fn frontend_port(fe: &Frontend) -> FrontendPort {
    FrontendPort {
        addr: addr_of(fe.addr),
        port: fe.port,
        proto: fe.proto.number(),
        _pad: 0,
    }
}

/// An address as the maps store it (IPv4 mapped into IPv6, see [`lb_common::Addr`]).
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => lb_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn fmt_range(
    f: &mut fmt::Formatter<'_>,
    verb: &str,
    rev_nat_id: u16,
    addr: &Addr,
    prefix: u8,
) -> fmt::Result {
    let (ip, len) = range_of(addr, prefix);
    write!(
        f,
        "{MAP_SOURCE_RANGES}: {verb} rev-NAT {rev_nat_id} range {ip}/{len}"
    )
}

/// A range (network, prefix length of its family) as the maps hold it: the mapped
/// address and the prefix on its 128 bits.
pub fn range_key(net: IpAddr, len: u8) -> (Addr, u8) {
    match net {
        IpAddr::V4(_) => (addr_of(net), 96 + len),
        IpAddr::V6(_) => (addr_of(net), len),
    }
}

/// [`range_key`] back to a range of the address's family.
pub fn range_of(addr: &Addr, prefix: u8) -> (IpAddr, u8) {
    let ip = ip_of(addr);
    match ip {
        IpAddr::V4(_) => (ip, prefix.saturating_sub(96)),
        IpAddr::V6(_) => (ip, prefix),
    }
}

/// The address a map entry holds, IPv4 when it is a mapped one.
pub fn ip_of(addr: &Addr) -> IpAddr {
    IpAddr::from(*addr).to_canonical()
}

pub fn service_key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        scope: fe.scope.number(),
        ..ServiceKey::new(addr_of(fe.addr), fe.port, fe.proto.number(), slot)
    }
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: ip_of(&key.addr),
        port: key.port,
        proto: Proto::from_number(key.proto)?,
        scope: Scope::from_number(key.scope)?,
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
    /// The Service port of each frontend, by rev-NAT id.
    pub names: BTreeMap<u16, FrontendName>,
    /// Written by the programs; the agent only deletes.
    pub affinity: BTreeMap<AffinityKey, AffinityValue>,
    /// (rev-NAT id, mapped address, prefix on 128 bits).
    pub source_ranges: BTreeSet<(u16, Addr, u8)>,
    /// The (address, port, protocol) frontends have.
    pub frontend_ports: BTreeSet<FrontendPort>,
    /// Frontends (header keys) with a Maglev table: its size and fingerprint.
    pub maglev: BTreeMap<ServiceKey, (u32, u64)>,
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
            Op::PutName { id, ref name } => {
                self.names.insert(id, **name);
            }
            Op::DelName { id } => {
                self.names.remove(&id);
            }
            Op::PurgeAffinity {
                rev_nat_id,
                backend_id,
            } => self
                .affinity
                .retain(|k, v| !purged(rev_nat_id, backend_id, k, v)),
            Op::PutSourceRange {
                rev_nat_id,
                addr,
                prefix,
            } => {
                self.source_ranges.insert((rev_nat_id, addr, prefix));
            }
            Op::DelSourceRange {
                rev_nat_id,
                addr,
                prefix,
            } => {
                self.source_ranges.remove(&(rev_nat_id, addr, prefix));
            }
            Op::PutFrontendPort { key } => {
                self.frontend_ports.insert(key);
            }
            Op::DelFrontendPort { key } => {
                self.frontend_ports.remove(&key);
            }
            Op::PutMaglev { key, ref spec } => {
                self.maglev.insert(key, (spec.size, spec.fingerprint));
            }
            Op::DelMaglev { key } => {
                self.maglev.remove(&key);
            }
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
