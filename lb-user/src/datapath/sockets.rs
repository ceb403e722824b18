//! Closing the sockets that our programs translated to a backend that has left its
//! service: the kernel's socket-diagnostics destroy command (`SOCK_DESTROY` on a
//! `NETLINK_SOCK_DIAG` socket, `CONFIG_INET_DIAG_DESTROY`), in every network namespace of
//! the processes under the agent's cgroup (the node's and the pods').
//!
//! Which sockets: the socket rev-NAT map holds (socket cookie, backend) -> frontend for
//! every socket a program translated. An entry whose (frontend, backend) pair has left is
//! stale; the socket with that cookie is destroyed if it is connected to that backend
//! (a connected UDP socket or a TCP connection: the application sees ECONNABORTED and
//! reconnects, and the next connect() is balanced over the live backends). A socket
//! connected to a pod directly has no entry and is never touched; an unconnected UDP
//! socket is not connected to the backend and is left alone (sendmsg sends its next
//! datagram to a backend that is still in the service).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{MAP_SOCK_REVNAT, RevNat, SockRevNatKey};

use super::{netlink, ops::ip_of, sys};

pub use lb_core::plan::Left;

/// A network namespace: the device and inode of its `/proc/PID/ns/net`.
pub type NsId = (u64, u64);

/// What one pass did.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// Entries of the socket rev-NAT map for pairs that left.
    pub stale: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Sockets looked at (in the namespaces entered; TCP and UDP, IPv4 and IPv6).
    pub scanned: usize,
    /// Network namespaces looked into.
    pub namespaces: usize,
    /// Network namespaces left for the next pass: this one ran out of time.
    pub unvisited: usize,
    /// Processes under the cgroup whose namespace could not be looked into: not in
    /// this agent's PID namespace (`cgroup.procs` says 0: the DaemonSet needs hostPID),
    /// or whose /proc/PID/ns/net could not be opened (CAP_SYS_PTRACE).
    pub skipped: usize,
    /// Network namespaces that could not be entered or searched.
    pub failed: usize,
    /// How long the pass took, the part of it that read the socket rev-NAT map, and the
    /// CPU time its threads used.
    pub elapsed: Duration,
    pub read: Duration,
    pub cpu: Duration,
    /// What failed (the pass goes on with the rest).
    pub errors: Vec<String>,
}

/// One pass of the closer: the pairs that left, and what it may look into.
pub struct Pass<'a> {
    /// Holds the socket rev-NAT map.
    pub pin_dir: &'a Path,
    /// Whose processes' network namespaces are looked into (and every cgroup below).
    pub cgroup: &'a Path,
    pub left: &'a BTreeSet<Left>,
    /// After this long no further namespace is entered: the rest wait for the next pass.
    pub budget: Duration,
}

impl Pass<'_> {
    /// Destroys the sockets translated to the backends in `left`, in each network
    /// namespace of the processes under the cgroup that is not in `done` (entered once
    /// however many processes share it); the namespaces entered are added to `done`.
    pub fn run(&self, done: &mut BTreeSet<NsId>) -> Report {
        let started = Instant::now();
        let cpu_before = thread_cpu();
        let mut report = Report::default();
        let mut pass_cpu = Duration::ZERO;
        let stale = self.stale_sockets(&mut report);
        report.read = started.elapsed();
        if let Some((stale, keys)) = stale {
            report.stale = keys.len();
            pass_cpu = self.visit(&stale, &keys, done, started, &mut report);
        }
        report.elapsed = started.elapsed();
        report.cpu = thread_cpu().saturating_sub(cpu_before) + pass_cpu;
        report
    }

    /// Cookie -> the backends (and protocols) its socket may be connected to and should
    /// not be, and the map's keys for them. The map's entries do not say the protocol:
    /// both are looked for.
    fn stale_sockets(&self, report: &mut Report) -> Option<(Stale, Vec<SockRevNatKey>)> {
        let entries = match read_sock_revnat(self.pin_dir) {
            Ok(e) => e,
            Err(e) => {
                report.errors.push(e);
                return None;
            }
        };
        let mut stale: Stale = HashMap::new();
        let mut keys = Vec::new();
        for (key, frontend) in entries {
            let (fe, be) = (
                (ip_of(&frontend.addr), frontend.port),
                (ip_of(&key.addr), key.port),
            );
            let mut is_stale = false;
            for proto in [lb_common::PROTO_TCP, lb_common::PROTO_UDP] {
                if self.left.contains(&(fe, be, proto)) {
                    stale
                        .entry(key.cookie)
                        .or_default()
                        .push((be.0, be.1, proto));
                    is_stale = true;
                }
            }
            if is_stale {
                keys.push(key);
            }
        }
        (!stale.is_empty()).then_some((stale, keys))
    }

    /// Enters the namespaces not in `done` until the budget is spent, destroying the
    /// stale sockets; then removes the map entries of the sockets destroyed. Returns the
    /// CPU time of the thread that entered them.
    fn visit(
        &self,
        stale: &Stale,
        keys: &[SockRevNatKey],
        done: &mut BTreeSet<NsId>,
        started: Instant,
        report: &mut Report,
    ) -> Duration {
        let namespaces = match namespaces_of(self.cgroup, report) {
            Ok(n) => n,
            Err(e) => {
                report.errors.push(format!(
                    "listing the processes of {}: {e}",
                    self.cgroup.display()
                ));
                return Duration::ZERO;
            }
        };
        let todo: Vec<(NsId, PathBuf)> = namespaces
            .into_iter()
            .filter(|(id, _)| !done.contains(id))
            .collect();
        let deadline = started + self.budget;
        // One thread enters the namespaces one after the other (a thread's network
        // namespace is its own) and ends with the pass.
        let (visits, cpu) = std::thread::scope(|s| {
            s.spawn(|| {
                background();
                let before = thread_cpu();
                let mut visits = Vec::new();
                for (id, ns) in &todo {
                    // At least one a pass, so that every pass makes progress.
                    if !visits.is_empty() && Instant::now() >= deadline {
                        break;
                    }
                    visits.push((*id, in_namespace(ns, || destroy_matching(stale))));
                }
                (visits, thread_cpu().saturating_sub(before))
            })
            .join()
            .unwrap_or_else(|_| (Vec::new(), Duration::ZERO))
        });
        report.unvisited = todo.len() - visits.len();
        let mut destroyed = BTreeSet::new();
        for (id, result) in visits {
            done.insert(id);
            report.namespaces += 1;
            match result {
                Ok(found) => {
                    report.scanned += found.scanned;
                    destroyed.extend(found.destroyed);
                }
                Err(e) => {
                    report.failed += 1;
                    let hint = if e.raw_os_error() == Some(libc::EPERM) {
                        " (entering a namespace needs CAP_SYS_ADMIN)"
                    } else {
                        ""
                    };
                    push_once(
                        &mut report.errors,
                        format!("network namespaces of processes under the cgroup: {e}{hint}"),
                    );
                }
            }
        }
        report.destroyed = destroyed.len();
        if let Err(e) = remove_entries(self.pin_dir, keys, &destroyed) {
            report.errors.push(e);
        }
        cpu
    }
}

/// Cookie -> the backends (address, port, protocol) its socket must not stay connected to.
type Stale = HashMap<u64, Vec<Target>>;

/// Every entry of the socket rev-NAT map pinned under `pin_dir`, read in batches (one
/// key at a time where the kernel has no batch reads).
fn read_sock_revnat(pin_dir: &Path) -> Result<Vec<(SockRevNatKey, RevNat)>, String> {
    let path = pin_dir.join(MAP_SOCK_REVNAT);
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let data = MapData::from_pin(&path).map_err(|e| err(&e))?;
    let cap = data.info().map_err(|e| err(&e))?.max_entries() as usize;
    match sys::map_lookup_batch(data.fd().as_fd(), cap) {
        Ok(entries) => return Ok(entries),
        // No batch reads here (ENOTSUPP is 524): key by key.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {}
        Err(e) => return Err(err(&e)),
    }
    let map =
        BpfHashMap::<MapData, SockRevNatKey, RevNat>::try_from(aya::maps::Map::LruHashMap(data))
            .map_err(|e| err(&e))?;
    // An entry evicted while the keys are walked is skipped.
    Ok(map.iter().take(cap).filter_map(Result::ok).collect())
}

/// Removes the keys of the sockets destroyed (their sockets are gone; the others stay:
/// an unconnected UDP socket still needs its replies from that backend translated back).
fn remove_entries(
    pin_dir: &Path,
    keys: &[SockRevNatKey],
    destroyed: &BTreeSet<u64>,
) -> Result<(), String> {
    if destroyed.is_empty() {
        return Ok(());
    }
    let path = pin_dir.join(MAP_SOCK_REVNAT);
    let mut map = MapData::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|m| {
            BpfHashMap::<MapData, SockRevNatKey, RevNat>::try_from(aya::maps::Map::LruHashMap(m))
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    for key in keys.iter().filter(|k| destroyed.contains(&k.cookie)) {
        let _ = map.remove(key);
    }
    Ok(())
}

/// This thread yields to the syncs and the node's own work (nice 10).
fn background() {
    // SAFETY: setpriority(2) on this thread (a thread id is a PRIO_PROCESS "who").
    unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::syscall(libc::SYS_gettid) as u32,
            10,
        );
    }
}

/// The CPU time (user and system) this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One `/proc/<pid>/ns/net` per network namespace of the processes under `cgroup`;
/// the processes that cannot be looked into are counted in `report` (with the cause).
fn namespaces_of(cgroup: &Path, report: &mut Report) -> io::Result<BTreeMap<NsId, PathBuf>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            // A pod's cgroup removed while the tree is walked: nothing to look into.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => return Err(e),
        };
        for pid in procs.lines().filter(|l| !l.is_empty()) {
            if pid == "0" {
                // A process outside this PID namespace.
                report.skipped += 1;
                push_once(&mut report.errors, "processes under the cgroup are not in this agent's PID namespace (cgroup.procs lists them as 0): run it in the host's (hostPID)".into());
                continue;
            }
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            match fs::metadata(&ns) {
                Ok(meta) => {
                    seen.entry((meta.dev(), meta.ino())).or_insert(ns);
                }
                // A process that exits meanwhile has no namespace to look into.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    report.skipped += 1;
                    push_once(
                        &mut report.errors,
                        format!(
                            "/proc/PID/ns/net of processes under the cgroup: {e} (needs CAP_SYS_PTRACE)"
                        ),
                    );
                }
            }
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    Ok(seen)
}

fn push_once(errors: &mut Vec<String>, e: String) {
    if !errors.contains(&e) {
        errors.push(e);
    }
}

/// Runs `f` in the network namespace `ns` on the calling thread, which must be the
/// pass's own: it stays in `ns` until it enters another or ends.
fn in_namespace<T>(ns: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let file = fs::File::open(ns)?;
    // SAFETY: setns(2) on a descriptor we own; it changes this thread's namespace only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    f()
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct inet_diag_sockid`.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ: usize = 8 + SOCKID;

/// A backend address, port and protocol a socket must not stay connected to.
type Target = (IpAddr, u16, u8);

/// What one namespace held.
#[derive(Default)]
struct Found {
    /// Sockets looked at.
    scanned: usize,
    /// Cookies of the sockets destroyed.
    destroyed: Vec<u64>,
}

/// In this thread's namespace: every TCP and UDP socket (IPv4 and IPv6) whose cookie is
/// in `stale` and which is connected to one of that cookie's targets is destroyed.
fn destroy_matching(stale: &Stale) -> io::Result<Found> {
    let nl = netlink::socket(netlink::NETLINK_SOCK_DIAG)?;
    let mut found = Found::default();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for protocol in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
            let mut targets = Vec::new();
            dump(&nl, family, protocol, |id| {
                found.scanned += 1;
                let cookie = u64::from(u32::from_ne_bytes(id[40..44].try_into().expect("4")))
                    | u64::from(u32::from_ne_bytes(id[44..48].try_into().expect("4"))) << 32;
                let Some(backends) = stale.get(&cookie) else {
                    return;
                };
                let dst = (
                    addr_of_id(family, &id[20..36]),
                    u16::from_be_bytes([id[2], id[3]]),
                    protocol,
                );
                if backends.contains(&dst) {
                    targets.push((cookie, *id));
                }
            })?;
            for (cookie, id) in targets {
                let flags = netlink::NLM_F_REQUEST | netlink::NLM_F_ACK;
                match netlink::request(&nl, &message(SOCK_DESTROY, flags, family, protocol, &id)) {
                    Ok(()) => found.destroyed.push(cookie),
                    // Closed meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(found)
}

/// A socket address of `inet_diag_sockid` (16 bytes; IPv4 in the first 4).
fn addr_of_id(family: u8, bytes: &[u8]) -> IpAddr {
    if family == libc::AF_INET as u8 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
        let v6 = Ipv6Addr::from(octets);
        // The programs keep IPv4 as mapped addresses; a v4-mapped peer is that IPv4.
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// The socket states worth a look (`idiag_states` bits of the kernel's TCP states): a
/// TCP connection an application may still hold (not listening, not in TIME_WAIT or
/// closed: a busy node has thousands of those), a UDP socket that is connected.
fn states(protocol: u8) -> u32 {
    const ESTABLISHED: u32 = 1;
    if protocol == libc::IPPROTO_UDP as u8 {
        return 1 << ESTABLISHED;
    }
    // SYN_SENT 2, FIN_WAIT1 4, FIN_WAIT2 5, CLOSE_WAIT 8, LAST_ACK 9, CLOSING 11.
    [ESTABLISHED, 2, 4, 5, 8, 9, 11]
        .iter()
        .fold(0, |m, s| m | 1 << s)
}

/// A netlink message: header and an `inet_diag_req_v2` for `family`, `protocol`, the
/// states worth a look, and the socket id `id`.
fn message(ty: u16, flags: u16, family: u8, protocol: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    let mut req = Vec::with_capacity(REQ);
    req.extend_from_slice(&[family, protocol, 0, 0]);
    req.extend_from_slice(&states(protocol).to_ne_bytes());
    req.extend_from_slice(id);
    netlink::message(ty, flags, &req)
}

/// Dumps the sockets of `family` and `protocol`, calling `each` with every socket id.
fn dump(
    nl: &OwnedFd,
    family: u8,
    protocol: u8,
    mut each: impl FnMut(&[u8; SOCKID]),
) -> io::Result<()> {
    let flags = netlink::NLM_F_REQUEST | netlink::NLM_F_DUMP;
    let msg = message(SOCK_DIAG_BY_FAMILY, flags, family, protocol, &[0; SOCKID]);
    netlink::dump(nl, &msg, |ty, payload| {
        // inet_diag_msg: family, state, timer, retrans, then the socket id.
        if ty == SOCK_DIAG_BY_FAMILY
            && let Some(id) = payload.get(4..4 + SOCKID)
        {
            each(id.try_into().expect("48 bytes"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_listed_once_and_vanished_cgroups_are_skipped() {
        // A cgroup tree as files: this process twice (one namespace), a pod cgroup that
        // went while the tree was walked (no cgroup.procs), and a process of another PID
        // namespace.
        let root = std::env::temp_dir().join(format!("lb-ns-walk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("pod-a")).unwrap();
        fs::create_dir_all(root.join("gone")).unwrap();
        fs::create_dir_all(root.join("hidden")).unwrap();
        let me = format!("{}\n", std::process::id());
        fs::write(root.join("cgroup.procs"), &me).unwrap();
        fs::write(root.join("pod-a/cgroup.procs"), &me).unwrap();
        fs::write(root.join("hidden/cgroup.procs"), "0\n").unwrap();
        let mut report = Report::default();
        let found = namespaces_of(&root, &mut report).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(report.skipped, 1);
        assert!(report.errors[0].contains("hostPID"), "{:?}", report.errors);
        // The root itself gone is an error.
        fs::remove_dir_all(&root).unwrap();
        assert!(namespaces_of(&root, &mut Report::default()).is_err());
    }

    #[test]
    fn requests_have_the_kernels_layout() {
        let mut id = [0u8; SOCKID];
        id[0..2].copy_from_slice(&80u16.to_be_bytes());
        let flags = netlink::NLM_F_REQUEST | netlink::NLM_F_ACK;
        let m = message(SOCK_DESTROY, flags, 2, 17, &id);
        assert_eq!(m.len(), 72, "nlmsghdr (16) + inet_diag_req_v2 (56)");
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            SOCK_DESTROY
        );
        assert_eq!(&m[16..20], &[2, 17, 0, 0]);
        assert_eq!(&m[24..26], &80u16.to_be_bytes());
        let v4: IpAddr = "10.244.1.2".parse().unwrap();
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&[10, 244, 1, 2]);
        assert_eq!(addr_of_id(libc::AF_INET as u8, &raw), v4);
        let mapped = Ipv4Addr::new(10, 244, 1, 2).to_ipv6_mapped().octets();
        assert_eq!(addr_of_id(libc::AF_INET6 as u8, &mapped), v4);
    }
}
