//! The maps the agent writes, opened from a loaded object or from their pins. The only
//! code that reads or writes BPF maps.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{
    Array, HashMap, HashOfMaps, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key,
};
use lb_common::{
    Addr, AffinityKey, AffinityValue, Backend, CT_EVENTS, Counters, CtKey, CtValue, DROP_REASONS,
    FrontendName, FrontendPort, MAP_AFFINITY, MAP_AFFINITY_SRC, MAP_BACKENDS, MAP_COUNTERS, MAP_CT,
    MAP_CT_EVENTS, MAP_DROPS, MAP_FRONTEND_PORTS, MAP_IFACES, MAP_MAGLEV, MAP_NAMES, MAP_REVNAT,
    MAP_SERVICES, MAP_SOCK_REVNAT, MAP_SOCKS, MAP_SOURCE_RANGES, PROG_NAMES, PacketIface, RevNat,
    ServiceKey, ServiceValue, SockRecord, SockRevNatKey, SourceRange, SrcAffinityKey,
};

use super::{
    iface::Iface,
    ops::{Op, Snapshot},
};

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
    names: HashMap<MapData, u16, FrontendName>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// The packet level's affinity (clients by source address); purged with `affinity`.
    affinity_src: HashMap<MapData, SrcAffinityKey, AffinityValue>,
    source_ranges: LpmTrie<MapData, SourceRange, u8>,
    frontend_ports: HashMap<MapData, FrontendPort, u8>,
    /// Frontend header key -> its Maglev table (an array of `u64`, see
    /// `lb_common::MAGLEV_HEAD`).
    maglev: Tables,
    /// `--maglev-table-size` in maglev mode, `None` in random mode (the plan's
    /// [`Capacity`](super::plan::Capacity) carries it).
    maglev_table_size: Option<u32>,
    /// Runs of writes go in one `BPF_MAP_UPDATE_BATCH` call; off once the kernel says it
    /// cannot.
    batch: bool,
}

/// Writes of one map that can go in one batch.
const MIN_BATCH: usize = 4;

fn trie(map: Map) -> Result<LpmTrie<MapData, SourceRange, u8>, DatapathError> {
    LpmTrie::try_from(map).map_err(|source| DatapathError::Map {
        map: MAP_SOURCE_RANGES,
        source,
    })
}

/// The trie key of a frontend's source range.
fn range_key(rev_nat_id: u16, addr: Addr, prefix: u8) -> Key<SourceRange> {
    Key::new(
        SourceRange::prefix_len(prefix),
        SourceRange {
            rev_nat_id_be: rev_nat_id.to_be(),
            _pad: [0; 2],
            addr,
        },
    )
}

/// The Maglev tables' outer map.
type Tables = HashOfMaps<MapData, ServiceKey, Array<MapData, u64>>;

fn tables(map: Map) -> Result<Tables, DatapathError> {
    HashOfMaps::try_from(map).map_err(|source| DatapathError::Map {
        map: MAP_MAGLEV,
        source,
    })
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
            names: typed(take(MAP_NAMES)?, MAP_NAMES)?,
            affinity: typed(take(MAP_AFFINITY)?, MAP_AFFINITY)?,
            affinity_src: typed(take(MAP_AFFINITY_SRC)?, MAP_AFFINITY_SRC)?,
            source_ranges: trie(take(MAP_SOURCE_RANGES)?)?,
            frontend_ports: typed(take(MAP_FRONTEND_PORTS)?, MAP_FRONTEND_PORTS)?,
            maglev: tables(take(MAP_MAGLEV)?)?,
            maglev_table_size: None,
            batch: true,
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
            names: typed(Map::HashMap(open(MAP_NAMES)?), MAP_NAMES)?,
            affinity: typed(Map::LruHashMap(open(MAP_AFFINITY)?), MAP_AFFINITY)?,
            affinity_src: typed(Map::LruHashMap(open(MAP_AFFINITY_SRC)?), MAP_AFFINITY_SRC)?,
            source_ranges: trie(Map::LpmTrie(open(MAP_SOURCE_RANGES)?))?,
            frontend_ports: typed(Map::HashMap(open(MAP_FRONTEND_PORTS)?), MAP_FRONTEND_PORTS)?,
            maglev: tables(Map::HashOfMaps(open(MAP_MAGLEV)?))?,
            maglev_table_size: None,
            batch: true,
        })
    }

    /// `--lb-algorithm maglev` with tables of `size` entries (`Some`), or random.
    pub fn set_maglev(&mut self, size: Option<u32>) {
        self.maglev_table_size = size;
    }

    /// The capacities the plan must respect, from the maps themselves (a pinned map keeps
    /// the size it was made with, whatever the flags say now).
    pub fn capacity(&self) -> Result<super::plan::Capacity, DatapathError> {
        use aya::maps::IterableMap as _;
        let max = |map: &MapData, name: &'static str| -> Result<usize, DatapathError> {
            map.info()
                .map(|i| i.max_entries() as usize)
                .map_err(|source| DatapathError::Map { map: name, source })
        };
        Ok(super::plan::Capacity {
            frontends: max(self.revnat.map(), MAP_REVNAT)?.min(max(self.names.map(), MAP_NAMES)?),
            service_entries: max(self.services.map(), MAP_SERVICES)?,
            backends: max(self.backends.map(), MAP_BACKENDS)?,
            source_ranges: max(self.source_ranges.map(), MAP_SOURCE_RANGES)?,
            maglev_table_size: self.maglev_table_size,
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
        for entry in self.names.iter() {
            let (k, v) = entry.map_err(err(MAP_NAMES))?;
            snap.names.insert(k, v);
        }
        for key in self.source_ranges.keys() {
            let key = key.map_err(err(MAP_SOURCE_RANGES))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(128) as u8;
            snap.source_ranges
                .insert((u16::from_be(data.rev_nat_id_be), data.addr, prefix));
        }
        for key in self.frontend_ports.keys() {
            snap.frontend_ports
                .insert(key.map_err(err(MAP_FRONTEND_PORTS))?);
        }
        // Entries may be evicted while we iterate: skip the ones that vanished.
        snap.affinity.extend(self.affinity.iter().flatten());
        snap.maglev = read_tables(&self.maglev);
        Ok(snap)
    }

    /// Writes a frontend's Maglev table: a new array, filled, then swapped in for the
    /// old one in one update of the outer map (a new flow sees the old table or the new
    /// one, never a half-written one).
    fn put_table(&mut self, key: ServiceKey, spec: &lb_core::maglev::Spec) -> Result<(), MapError> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let elements = spec.elements();
        let mut table =
            Array::<MapData, u64>::create(elements.len() as u32, lb_common::MAGLEV_INNER_FLAGS)?;
        let indices: Vec<u32> = (0..elements.len() as u32).collect();
        // One call for the whole table where the kernel has batches (5.6+).
        let batched = self.batch
            && super::sys::map_update_batch(table.map().fd().as_fd(), &indices, &elements).is_ok();
        if !batched {
            for (i, e) in indices.iter().zip(&elements) {
                table.set(*i, e, 0)?;
            }
        }
        self.maglev.insert(key, &table, 0)
    }

    /// Deletes the affinity entries that any of `purges` (rev-NAT id, backend) names, in
    /// one pass over each affinity map (socket level and packet level).
    fn purge_affinity(&mut self, purges: &[(u16, Option<u32>)]) -> Result<(), MapError> {
        purge(&mut self.affinity, |k| k.rev_nat_id, purges)?;
        purge(&mut self.affinity_src, |k| k.rev_nat_id, purges)
    }

    /// Applies the operations in order; stops at the first that fails. A run of
    /// consecutive affinity purges is one pass over the affinity map.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        let mut i = 0;
        while i < ops.len() {
            if let Some(done) = self.put_batch(&ops[i..])? {
                i += done;
                continue;
            }
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
                Op::PutName { id, ref name } => self.names.insert(id, **name, 0),
                Op::DelName { id } => ignore_missing(self.names.remove(&id)),
                Op::PutSourceRange {
                    rev_nat_id,
                    addr,
                    prefix,
                } => self
                    .source_ranges
                    .insert(&range_key(rev_nat_id, addr, prefix), 1, 0),
                Op::DelSourceRange {
                    rev_nat_id,
                    addr,
                    prefix,
                } => ignore_missing(
                    self.source_ranges
                        .remove(&range_key(rev_nat_id, addr, prefix)),
                ),
                Op::PutFrontendPort { key } => self.frontend_ports.insert(key, 1, 0),
                Op::DelFrontendPort { key } => ignore_missing(self.frontend_ports.remove(&key)),
                Op::PutMaglev { key, ref spec } => self.put_table(key, spec),
                Op::DelMaglev { key } => ignore_missing(self.maglev.remove(&key)),
            };
            result.map_err(|source| write_error(op, source))?;
        }
        if ops
            .iter()
            .any(|op| matches!(op, Op::PutMaglev { .. } | Op::DelMaglev { .. }))
        {
            self.log_tables();
        }
        Ok(())
    }

    /// Logs how many Maglev tables there are and the memory their entries take.
    fn log_tables(&self) {
        let tables = self.maglev.keys().count();
        let size = self.maglev_table_size.unwrap_or(0);
        let bytes = tables as u64 * lb_core::maglev::table_bytes(size);
        tracing::info!(
            tables,
            table_size = size,
            kib = bytes / 1024,
            "Maglev tables: {tables} of {size} entries, {} KiB",
            bytes / 1024
        );
    }

    /// Writes the run of puts into one map that `ops` starts with in one batch call, if
    /// it is long enough; returns how many operations that took (`None`: not a run, or
    /// no batches here, so the caller writes one by one). Every hash map the plan writes
    /// in runs takes batches: a first sync at 10k services writes 10k rev-NAT entries,
    /// names and frontend ports, not only the slots and backends.
    fn put_batch(&mut self, ops: &[Op]) -> Result<Option<usize>, DatapathError> {
        use aya::maps::IterableMap as _;
        if !self.batch {
            return Ok(None);
        }
        let result = match ops.first() {
            Some(Op::PutService { .. }) => batch_into(self.services.map(), ops, |op| match *op {
                Op::PutService { key, value } => Some((key, value)),
                _ => None,
            }),
            Some(Op::PutBackend { .. }) => batch_into(self.backends.map(), ops, |op| match *op {
                Op::PutBackend { id, value } => Some((id, value)),
                _ => None,
            }),
            Some(Op::PutRevNat { .. }) => batch_into(self.revnat.map(), ops, |op| match *op {
                Op::PutRevNat { id, value } => Some((id, value)),
                _ => None,
            }),
            Some(Op::PutName { .. }) => batch_into(self.names.map(), ops, |op| match *op {
                Op::PutName { id, ref name } => Some((id, **name)),
                _ => None,
            }),
            Some(Op::PutFrontendPort { .. }) => {
                batch_into(self.frontend_ports.map(), ops, |op| match *op {
                    Op::PutFrontendPort { key } => Some((key, 1u8)),
                    _ => None,
                })
            }
            _ => return Ok(None),
        };
        match result {
            Ok(n) => Ok(n),
            Err((_, e)) if unsupported(&e) => {
                tracing::info!("batched map writes unavailable ({e}); writing one at a time");
                self.batch = false;
                Ok(None)
            }
            Err((done, e)) => Err(write_error(
                &ops[done],
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e,
                }),
            )),
        }
    }
}

/// A batch write into `map` of the run of `ops` that `entry` turns into (key, value);
/// `Ok(None)` when the run is too short to be worth one. A long run is written by two
/// threads at once, each half in one call: the kernel's work per entry (allocating and
/// hashing it) is most of a first sync's write time, and the entries of a run are
/// distinct keys, so their order does not matter.
fn batch_into<K: aya::Pod + Send + Sync, V: aya::Pod + Send + Sync>(
    map: &MapData,
    ops: &[Op],
    entry: impl Fn(&Op) -> Option<(K, V)>,
) -> Result<Option<usize>, (usize, std::io::Error)> {
    use std::os::fd::AsFd as _;
    let (keys, values): (Vec<K>, Vec<V>) = ops.iter().map_while(entry).unzip();
    if keys.len() < MIN_BATCH {
        return Ok(None);
    }
    let fd = map.fd().as_fd();
    // The kernel counts what went in only in its loop: an error before it leaves the
    // count at all of them, and then it is the first that failed.
    let write = |keys: &[K], values: &[V]| {
        super::sys::map_update_batch(fd, keys, values)
            .map_err(|(done, e)| (if done < keys.len() { done } else { 0 }, e))
    };
    if keys.len() < PARALLEL_BATCH || !two_cpus() {
        write(&keys, &values)?;
        return Ok(Some(keys.len()));
    }
    let half = keys.len() / 2;
    let (first, second) = std::thread::scope(|s| {
        let second = s.spawn(|| write(&keys[half..], &values[half..]));
        let first = write(&keys[..half], &values[..half]);
        (first, second.join())
    });
    first?;
    match second {
        Ok(result) => result.map_err(|(done, e)| (half + done, e))?,
        Err(_) => return Err((half, std::io::Error::other("the writing thread panicked"))),
    }
    Ok(Some(keys.len()))
}

/// Runs at least this long are written by two threads.
const PARALLEL_BATCH: usize = 8192;

/// Whether the process may run on two CPUs or more.
fn two_cpus() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// The kernel has no batch operations for this map.
fn unsupported(e: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own, not in libc.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn write_error(op: &Op, source: MapError) -> DatapathError {
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
}

/// The Maglev tables in `outer`: each frontend's table size and fingerprint (the first
/// two elements). A table that vanishes or cannot be read meanwhile is left out (the
/// next plan writes it again).
fn read_tables(outer: &Tables) -> BTreeMap<ServiceKey, (u32, u64)> {
    let mut out = BTreeMap::new();
    for key in outer.keys().flatten() {
        let Ok(table) = outer.get(&key, 0) else {
            continue;
        };
        if let (Ok(size), Ok(fingerprint)) = (table.get(&0, 0), table.get(&1, 0)) {
            out.insert(key, (size as u32, fingerprint));
        }
    }
    out
}

/// The Maglev tables pinned under `dir`: each frontend's (header key) table size;
/// empty when there is no such map (an agent of an older layout).
pub fn read_maglev(dir: &Path) -> Result<BTreeMap<ServiceKey, u32>, DatapathError> {
    let path = dir.join(MAP_MAGLEV);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let map = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.display().to_string(),
        source,
    })?;
    let outer = tables(Map::HashOfMaps(map))?;
    Ok(read_tables(&outer)
        .into_iter()
        .map(|(k, (size, _))| (k, size))
        .collect())
}

/// Points the packet level (tc and XDP) at the node's address on each interface (the SNAT source);
/// entries of interfaces no longer attached are removed.
pub fn write_ifaces(ebpf: &mut aya::Ebpf, ifaces: &[Iface]) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Map {
        map: MAP_IFACES,
        source,
    };
    let map = ebpf
        .map_mut(MAP_IFACES)
        .ok_or(DatapathError::MissingMap { map: MAP_IFACES })?;
    let mut map: HashMap<&mut MapData, u32, PacketIface> = HashMap::try_from(map).map_err(err)?;
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !ifaces.iter().any(|i| i.ifindex == *k))
        .collect();
    for k in stale {
        ignore_missing(map.remove(&k)).map_err(err)?;
    }
    for i in ifaces {
        let value = PacketIface {
            addr4: i
                .addr4
                .map_or([0; 16], |a| lb_common::v4_mapped(a.octets())),
            addr6: i.addr6.map_or([0; 16], |a| a.octets()),
        };
        map.insert(i.ifindex, value, 0).map_err(err)?;
    }
    Ok(())
}

/// The live connection-tracking entries pinned under `dir` (both directions of every
/// flow the packet level translates).
pub fn read_conntrack(dir: &Path) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
    let path = dir.join(MAP_CT);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.display().to_string(),
        source,
    })?;
    let map: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(|source| DatapathError::Map {
            map: MAP_CT,
            source,
        })?;
    // Entries may be evicted while we iterate: skip the ones that vanished.
    Ok(map.iter().flatten().collect())
}

/// Every row (index 0 to `rows`) of the per-CPU array `map` pinned under `dir`, each as
/// its per-CPU values.
fn per_cpu_rows<V: aya::Pod>(
    dir: &Path,
    map: &'static str,
    rows: usize,
) -> Result<Vec<aya::maps::PerCpuValues<V>>, DatapathError> {
    let path = dir.join(map);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.display().to_string(),
        source,
    })?;
    let array: PerCpuArray<MapData, V> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|source| DatapathError::Map { map, source })?;
    (0..rows as u32)
        .map(|i| {
            array
                .get(&i, 0)
                .map_err(|source| DatapathError::Map { map, source })
        })
        .collect()
}

/// Entries of the socket level's per-socket maps pinned under `dir`: the socket
/// rev-NAT map and the sockets map, in that order. Their keys are walked (one syscall
/// each, at most the map's capacity: a walk that an eviction restarts still ends).
pub fn count_socket_entries(dir: &Path) -> Result<[(&'static str, usize); 2], DatapathError> {
    Ok([
        (
            MAP_SOCK_REVNAT,
            count_lru::<SockRevNatKey, RevNat>(dir, MAP_SOCK_REVNAT)?,
        ),
        (MAP_SOCKS, count_lru::<u64, SockRecord>(dir, MAP_SOCKS)?),
    ])
}

/// Entries of the LRU map `map` pinned under `dir`, walking at most its capacity of keys.
fn count_lru<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    dir: &Path,
    map: &'static str,
) -> Result<usize, DatapathError> {
    let path = dir.join(map);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
        path: path.display().to_string(),
        source,
    })?;
    let cap = data
        .info()
        .map_err(|source| DatapathError::Map { map, source })?
        .max_entries() as usize;
    // Read in batches where the kernel can (a few calls for a full map), else key by key.
    if let Ok(entries) =
        super::sys::map_lookup_batch::<K, V>(std::os::fd::AsFd::as_fd(data.fd()), cap)
    {
        return Ok(entries.len());
    }
    let typed: HashMap<MapData, K, V> = HashMap::try_from(Map::LruHashMap(data))
        .map_err(|source| DatapathError::Map { map, source })?;
    Ok(typed.keys().take(cap).filter(Result::is_ok).count())
}

/// The per-program counters from the maps pinned under `dir`, summed over CPUs, in
/// `PROG_NAMES` order.
pub fn read_counters(dir: &Path) -> Result<Vec<(&'static str, Counters)>, DatapathError> {
    let rows = per_cpu_rows::<Counters>(dir, MAP_COUNTERS, PROG_NAMES.len())?;
    Ok(PROG_NAMES
        .iter()
        .zip(rows)
        .map(|(name, per_cpu)| {
            let mut total = Counters::default();
            for c in per_cpu.iter() {
                total.add(c);
            }
            (*name, total)
        })
        .collect())
}

/// The packet level's drops per reason (`DROP_REASONS` order), summed over CPUs, from the
/// map pinned under `dir`.
pub fn read_drops(dir: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    read_tally(dir, MAP_DROPS, &DROP_REASONS)
}

/// The packet level's connection-tracking events per kind (`CT_EVENTS` order), summed
/// over CPUs, from the map pinned under `dir`.
pub fn read_ct_events(dir: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    read_tally(dir, MAP_CT_EVENTS, &CT_EVENTS)
}

/// A per-CPU array of counts pinned as `map` under `dir`, named by `names`, summed.
fn read_tally(
    dir: &Path,
    map: &'static str,
    names: &[&'static str],
) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    let rows = per_cpu_rows::<u64>(dir, map, names.len())?;
    Ok(names
        .iter()
        .zip(rows)
        .map(|(name, per_cpu)| (*name, per_cpu.iter().sum()))
        .collect())
}

/// Deletes the entries of an affinity map that any of `purges` (rev-NAT id, backend)
/// names; `rev_nat_id` reads a key's frontend.
fn purge<K: aya::Pod>(
    map: &mut HashMap<MapData, K, AffinityValue>,
    rev_nat_id: impl Fn(&K) -> u16,
    purges: &[(u16, Option<u32>)],
) -> Result<(), MapError> {
    let doomed: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| {
            purges
                .iter()
                .any(|(r, b)| *r == rev_nat_id(k) && b.is_none_or(|b| b == v.backend_id))
        })
        .map(|(k, _)| k)
        .collect();
    for k in doomed {
        ignore_missing(map.remove(&k))?;
    }
    Ok(())
}

/// Deleting an entry that is already gone is what we wanted.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The pinned BPF maps are the agent's datapath.
impl lb_core::seam::Datapath for BpfMaps {
    type Error = DatapathError;

    fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        BpfMaps::apply(self, ops)
    }

    fn snapshot(&mut self) -> Result<Snapshot, DatapathError> {
        BpfMaps::snapshot(self)
    }

    fn capacity(&self) -> Result<super::plan::Capacity, DatapathError> {
        BpfMaps::capacity(self)
    }
}
