//! Loads the eBPF object, pins its maps and attaches the programs to a cgroup.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
};
use lb_common::PINNED_MAPS;

use std::os::fd::AsFd as _;

use super::{checks, iface::Iface, prealloc, sys, tcfilter};

/// The programs, built by lb-user's build script from lb-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));
/// The same programs built without `bpf_set_retval` (lb-ebpf's feature `no-set-retval`).
static EBPF_OBJECT_NO_SET_RETVAL: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf-no-set-retval.o"));

/// Which of the two embedded objects the agent loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfObject {
    /// The programs as written: a refused connect() gets ECONNREFUSED (or EHOSTUNREACH).
    Full,
    /// Built without `bpf_set_retval`, for kernels whose sock_addr programs cannot call
    /// it (before 6.1): a refused connect() or sendmsg() gets EPERM.
    NoSetRetval,
}

impl EbpfObject {
    /// The object for a kernel that has (`true`) or lacks `bpf_set_retval` in sock_addr
    /// programs.
    pub fn for_kernel(has_set_retval: bool) -> Self {
        if has_set_retval {
            Self::Full
        } else {
            Self::NoSetRetval
        }
    }

    /// Its name in the log and in `lb-user dump`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::NoSetRetval => "no-set-retval",
        }
    }

    pub(crate) fn bytes(self) -> &'static [u8] {
        match self {
            Self::Full => EBPF_OBJECT,
            Self::NoSetRetval => EBPF_OBJECT_NO_SET_RETVAL,
        }
    }
}

/// The map that only the programs of [`EbpfObject::NoSetRetval`] use (not pinned).
const NO_SET_RETVAL_MAP: &str = "LB_SOCK_EPERM";

/// The sock_addr programs, by function name in lb-ebpf (the attach point is in each
/// program's section name).
pub const PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];

/// The cgroup sock program that runs when a socket is released: it deletes the socket's
/// rev-NAT entries.
pub const RELEASE_PROGRAM: &str = "lb_sock_release";

/// Every program attached to the agent's cgroup.
pub const CGROUP_PROGRAMS: [&str; 9] = [
    PROGRAMS[0],
    PROGRAMS[1],
    PROGRAMS[2],
    PROGRAMS[3],
    PROGRAMS[4],
    PROGRAMS[5],
    PROGRAMS[6],
    PROGRAMS[7],
    RELEASE_PROGRAM,
];

/// The tc programs and where each attaches on an external interface.
pub const TC_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("lb_tc_ingress", TcAttachType::Ingress),
    ("lb_tc_egress", TcAttachType::Egress),
];

/// The XDP program on each external interface (`--acceleration`).
pub const XDP_PROGRAM: &str = "lb_xdp";

/// Where the packet level runs XDP (`--acceleration`, as Cilium's
/// `loadBalancer.acceleration`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Acceleration {
    /// In each external interface's driver (native XDP; veth has it), or in the stack's
    /// generic hook where the driver has none.
    Native,
    /// In the stack's generic XDP hook, whatever the driver.
    Generic,
    /// tc only.
    #[default]
    Off,
}

impl Acceleration {
    /// The mode's name in link pins and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        }
    }
}

/// Default directory for pinned maps.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "--pin-path {path}: {why} (BPF maps can only be pinned on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    PinPath { path: PathBuf, why: String },
    #[error("--cgroup {path}: {why}{hint}")]
    Cgroup {
        path: PathBuf,
        why: String,
        hint: String,
    },
    #[error("loading the eBPF object: {0} (the agent needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of {name} on {iface} at {path}: {why}")]
    PinLink {
        iface: String,
        name: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "pinned map {path}: {why}; a build with another layout pinned it: run `lb-user cleanup --pin-path DIR` (connections through the old maps will be cut) or use another --pin-path"
    )]
    Layout { path: PathBuf, why: String },
    #[error(
        "pinned map {path} holds {pinned} entries, {flag} asks for {want}: a pinned map keeps its size. \
         To resize it, stop the agent, run `lb-user cleanup --pin-path DIR` (connections through the maps are cut) \
         and start it again; or keep the size: {flag} to match {pinned}"
    )]
    Size {
        path: PathBuf,
        pinned: u32,
        want: u32,
        flag: &'static str,
    },
    #[error(
        "--pin-path {path}: another agent is running on it (it holds the directory's lock); stop it first, or give this one another --pin-path"
    )]
    Busy { path: PathBuf },
    #[error(
        "program {name}: the kernel refused to load it ({errno}); the verifier's last lines:\n{last}\n(`LB_LOG=debug` logs the whole verifier output)"
    )]
    Verifier {
        name: &'static str,
        errno: std::io::Error,
        last: String,
    },
    #[error(
        "--interface {iface}: this kernel lacks {missing}: the packet level cannot run on it (the socket level does; every feature was measured to work on {measured})"
    )]
    PacketLevel {
        iface: String,
        missing: String,
        measured: &'static str,
    },
    #[error("--interface {iface}: attaching {name}: {source}")]
    Attach {
        iface: String,
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// First mount point of a filesystem type, from /proc/mounts.
pub fn mount_point(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where bpf filesystems are mounted by convention.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Mounts the bpf filesystem at /sys/fs/bpf when nothing is mounted there (as systemd or
/// Cilium's agent would), so a pin path under it works on a bare machine.
fn ensure_bpf_fs_root() -> Result<(), String> {
    let root = Path::new(BPF_FS_ROOT);
    if fs_magic(root) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    if !root.is_dir() {
        return Err(format!("{BPF_FS_ROOT} does not exist"));
    }
    // Mode 0700, as systemd mounts it: the kernel's default is 1777, which lets any user
    // make pins there.
    // SAFETY: all pointers are NUL-terminated literals; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting a bpf filesystem at {BPF_FS_ROOT}: {}",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!("mounted a bpf filesystem at {BPF_FS_ROOT} (mode 0700)");
    Ok(())
}

/// Creates the pin directory if needed (mode 0700) and checks that it is on a bpf
/// filesystem and that no other user can change what is pinned there.
pub fn prepare_pin_dir(path: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let err = |why: String| LoadError::PinPath {
        path: path.to_path_buf(),
        why,
    };
    if path.starts_with(BPF_FS_ROOT) {
        ensure_bpf_fs_root().map_err(err)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| err(format!("cannot create it: {e}")))?;
    match fs_magic(path) {
        Some(BPF_FS_MAGIC) => {}
        Some(_) => return Err(err("not on a bpf filesystem".into())),
        None => return Err(err("cannot stat it".into())),
    }
    check_trusted(path).map_err(err)?;
    check_no_symlinks(path).map_err(err)
}

/// Refuses a pin directory another user could change: it must be a directory (not a
/// symlink) owned by this process's user and writable by nobody else, and each
/// directory above it must be owned by root or this user and not writable by others
/// (a sticky one, as /sys/fs/bpf often is, is fine: nobody can rename what is ours).
pub fn check_trusted(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot stat it: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err("it is a symlink: give the directory itself".into());
    }
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "owned by uid {} with mode {:o}: another user could replace the maps or links pinned there;              it must be owned by uid {me} and writable by nobody else (`chown {me} DIR && chmod 0700 DIR`)",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    for parent in dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(parent) else {
            continue;
        };
        let sticky = m.mode() & 0o1000 != 0;
        let open = m.mode() & 0o022 != 0 && !sticky;
        if (m.uid() != 0 && m.uid() != me) || open {
            return Err(format!(
                "{} above it is owned by uid {} with mode {:o}: another user could replace the pin directory",
                parent.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// Refuses symlinks where the maps and links are pinned: opening a pin follows them
/// (BPF_OBJ_GET has no O_NOFOLLOW), and a symlink could make this agent write another
/// agent's map. With [`check_trusted`] nobody else can add one afterwards.
pub fn check_no_symlinks(dir: &Path) -> Result<(), String> {
    let links = std::fs::read_dir(dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let pins = PINNED_MAPS
        .iter()
        .map(|m| dir.join(m))
        .chain([dir.join("links")]);
    for path in pins.chain(links) {
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && m.file_type().is_symlink()
        {
            let to = std::fs::read_link(&path).unwrap_or_default();
            return Err(format!(
                "{} is a symlink (to {}): pins are never followed; remove it",
                path.display(),
                to.display()
            ));
        }
    }
    Ok(())
}

/// Opens a cgroup v2 directory for attaching.
pub fn open_cgroup(path: &Path) -> Result<File, LoadError> {
    let hint = match mount_point("cgroup2") {
        Some(m) => format!(" (cgroup v2 is mounted at {})", m.display()),
        None => " (no cgroup v2 filesystem is mounted on this machine)".to_string(),
    };
    let err = |why: String| LoadError::Cgroup {
        path: path.to_path_buf(),
        why,
        hint: hint.clone(),
    };
    match fs_magic(path) {
        Some(CGROUP2_SUPER_MAGIC) => {}
        Some(_) => return Err(err("not a cgroup v2 directory".into())),
        None => return Err(err("does not exist or cannot be read".into())),
    }
    File::open(path).map_err(|e| err(format!("cannot open it: {e}")))
}

/// Loads the object with its maps pinned under `pin_dir` (reusing maps already pinned
/// there, so a restarted agent keeps the datapath), loads every program and attaches it
/// to `cgroup` (see [`attach_cgroup`]). Until [`PinLock::started`] is called on the
/// returned lock, dropping it removes what this start pinned (see [`StartJournal`]).
/// `object` says which of the two embedded objects.
pub fn load_and_attach(
    pin_dir: &Path,
    cgroup_path: &Path,
    bpf_log_level: u8,
    sizes: &MapSizes,
    object: EbpfObject,
) -> Result<(Ebpf, PinLock), LoadError> {
    let cgroup = open_cgroup(cgroup_path)?;
    let dir_existed = std::fs::symlink_metadata(pin_dir).is_ok();
    prepare_pin_dir(pin_dir)?;
    let mut lock = PinLock::take(pin_dir)?;
    lock.journal = Some(StartJournal::record(pin_dir, dir_existed));
    check_pinned_layout(pin_dir)?;
    check_pinned_sizes(pin_dir, sizes)?;
    preallocate(pin_dir, sizes, object);
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    // A map already pinned keeps the size it was made with.
    for (name, entries) in sizes.entries() {
        loader.map_max_entries(name, entries);
    }
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global("AYA_LOG_LEVEL", &bpf_log_level, false);
    let mut ebpf = loader.load(object.bytes()).map_err(LoadError::Load)?;
    let cgroup_id = attach_cgroup(&mut ebpf, pin_dir, cgroup_path, &cgroup)?;
    if let Some(journal) = lock.journal.as_mut() {
        journal.cgroup_id = Some(cgroup_id);
    }
    Ok((ebpf, lock))
}

/// Makes the maps of [`prealloc::PREALLOCATED`] preallocated before the load (with
/// `--preallocate-maps`), and says in the log what became of each.
fn preallocate(pin_dir: &Path, sizes: &MapSizes, object: EbpfObject) {
    let entries = sizes.entries();
    let max_entries = |name: &str| {
        entries
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, e)| *e)
    };
    let made = prealloc::make(object.bytes(), pin_dir, sizes.preallocate_maps, max_entries);
    for (map, made) in made {
        match made {
            prealloc::Made::Preallocated => {
                tracing::debug!(map, entries = max_entries(map), "map made preallocated");
            }
            prealloc::Made::Pinned { preallocated } if preallocated != sizes.preallocate_maps => {
                tracing::info!(
                    map,
                    preallocated,
                    "a map already pinned keeps how it was made, preallocated or not, until \
                     `lb-user cleanup` (--preallocate-maps={} applies to maps made anew)",
                    sizes.preallocate_maps
                );
            }
            prealloc::Made::Pinned { .. } => {}
            prealloc::Made::Declined(why) => {
                tracing::warn!(
                    map,
                    "cannot make the map preallocated, so it takes memory as entries are \
                     written (writes cost about three times as much): {why}"
                );
            }
        }
    }
}

/// The maps' capacities (`lb-user run` flags). The services and backends maps are
/// preallocated unless `--preallocate-maps=false`, and the LRU maps (affinity, socket
/// rev-NAT, connection tracking) always are: their sizes are memory; the others take
/// memory as entries are written and their sizes are limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct MapSizes {
    /// Most frontends programmed: a frontend is one Service port on one address (a
    /// cluster IP, an external or LoadBalancer IP, a node address for a nodePort).
    #[arg(long, default_value_t = lb_common::MAX_REVNAT,
          value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub max_services: u32,
    /// Most distinct backends (pod address, port, protocol).
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_backends: u32,
    /// Most backend slots over all frontends (a backend of several frontends takes one
    /// in each).
    #[arg(long, default_value_t = lb_common::MAX_SERVICE_ENTRIES,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_slots: u32,
    /// Capacity of each ClientIP affinity map (socket level, packet level); least
    /// recently used entries go first when full. Preallocated.
    #[arg(long, default_value_t = lb_common::MAX_AFFINITY,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_affinity: u32,
    /// Capacity of the socket level's reverse translation map (one entry per connected
    /// UDP socket or TCP connection to a service, and per service an unconnected UDP
    /// socket sends to; deleted when the socket is closed, least recently used go first
    /// when full) and of the map of sockets beside it. Preallocated. At least 1024.
    #[arg(long, default_value_t = lb_common::MAX_SOCK_REVNAT,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sock_revnat: u32,
    /// Capacity of the packet level's connection-tracking map (two entries per flow;
    /// least recently used ones go first when it is full). Preallocated.
    #[arg(long, default_value_t = lb_common::MAX_CT,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub ct_max_entries: u32,
    /// Make the services and backends maps preallocated: their memory, for every entry
    /// `--max-services`, `--max-slots` and `--max-backends` allow, is taken when they are
    /// made (about 58 MiB with the defaults), and a write then allocates nothing, about a
    /// third of the cost (the first sync at 10,000 services). With `false` their memory
    /// follows what is programmed. A map already pinned keeps how it was made.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub preallocate_maps: bool,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_services: lb_common::MAX_REVNAT,
            max_backends: lb_common::MAX_BACKENDS,
            max_slots: lb_common::MAX_SERVICE_ENTRIES,
            max_affinity: lb_common::MAX_AFFINITY,
            max_sock_revnat: lb_common::MAX_SOCK_REVNAT,
            ct_max_entries: lb_common::MAX_CT,
            preallocate_maps: true,
        }
    }
}

impl MapSizes {
    /// The flag(s) that size map `name`.
    pub fn flag_of(name: &str) -> &'static str {
        use lb_common::*;
        match name {
            MAP_SERVICES => "--max-services plus --max-slots",
            MAP_BACKENDS => "--max-backends",
            MAP_REVNAT | MAP_NAMES | MAP_MAGLEV => "--max-services",
            MAP_AFFINITY | MAP_AFFINITY_SRC => "--max-affinity",
            MAP_SOCK_REVNAT | MAP_SOCKS => "--max-sock-revnat",
            MAP_CT => "--ct-max-entries",
            _ => "no flag",
        }
    }

    /// (map, max_entries) for each map sized by a flag.
    pub fn entries(&self) -> [(&'static str, u32); 10] {
        use lb_common::*;
        [
            (
                MAP_SERVICES,
                self.max_services.saturating_add(self.max_slots),
            ),
            (MAP_BACKENDS, self.max_backends),
            (MAP_REVNAT, self.max_services),
            (MAP_NAMES, self.max_services),
            (MAP_MAGLEV, self.max_services),
            (MAP_AFFINITY, self.max_affinity),
            (MAP_AFFINITY_SRC, self.max_affinity),
            (MAP_SOCK_REVNAT, self.max_sock_revnat),
            (MAP_SOCKS, self.max_sock_revnat),
            (MAP_CT, self.ct_max_entries),
        ]
    }
}

/// An exclusive lock on the pin directory (flock), held while an agent or a cleanup
/// works on it: two agents on one pin path would undo each other's writes.
pub struct PinLock {
    _dir: File,
    /// While a start may still fail: what the pin directory held before it.
    journal: Option<StartJournal>,
}

/// What the pin directory held before a start loaded anything. If the start fails,
/// every pin it made (maps, and links, whose removal detaches them) is removed, and what
/// an earlier agent pinned there is kept, as it was.
struct StartJournal {
    pin_dir: PathBuf,
    /// Whether the pin directory and its links/ existed.
    dir_existed: bool,
    links_existed: bool,
    /// The pins found (maps, and links under links/).
    before: std::collections::BTreeSet<PathBuf>,
    /// The cgroup the start attached to, once it has.
    cgroup_id: Option<u64>,
}

/// The files in `dir` and in `dir`/links.
fn pins_under(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
    [dir.to_path_buf(), dir.join("links")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .collect()
}

impl StartJournal {
    fn record(pin_dir: &Path, dir_existed: bool) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            dir_existed,
            links_existed: pin_dir.join("links").is_dir(),
            before: pins_under(pin_dir),
            cgroup_id: None,
        }
    }

    /// Removes what the start pinned; returns how many pins.
    fn roll_back(&self) -> usize {
        let Self {
            pin_dir,
            dir_existed,
            links_existed,
            before,
            cgroup_id: _,
        } = self;
        let made: Vec<PathBuf> = pins_under(pin_dir)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        for p in &made {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(pin = %p.display(), "removing a pin of the failed start: {e}");
            }
        }
        if !links_existed {
            let _ = std::fs::remove_dir(pin_dir.join("links"));
        }
        if !dir_existed {
            let _ = std::fs::remove_dir(pin_dir);
        }
        made.len()
    }
}

impl Drop for PinLock {
    /// A start that did not succeed leaves nothing behind (the lock is released after).
    fn drop(&mut self) {
        if let Some(journal) = self.journal.take() {
            let removed = journal.roll_back();
            tracing::warn!(
                pin_path = %journal.pin_dir.display(),
                "the start failed: removed the {removed} pins it made (maps, and links, which detaches their programs); what an earlier agent pinned is kept"
            );
        }
    }
}

impl PinLock {
    /// The start succeeded: what it pinned stays. Now the pins it replaced go: the
    /// links of a cgroup no longer used and maps of an older layout.
    pub fn started(&mut self) {
        if let Some(journal) = self.journal.take() {
            if let Some(id) = journal.cgroup_id {
                remove_stale_cgroup_links(&journal.pin_dir, id);
            }
            remove_stale_maps(&journal.pin_dir);
        }
    }

    pub fn take(pin_dir: &Path) -> Result<Self, LoadError> {
        use std::os::fd::AsRawFd as _;
        let err = |why: String| LoadError::PinPath {
            path: pin_dir.to_path_buf(),
            why,
        };
        let dir = File::open(pin_dir).map_err(|e| err(format!("cannot open it: {e}")))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                LoadError::Busy {
                    path: pin_dir.to_path_buf(),
                }
            } else {
                err(format!("cannot lock it: {e}"))
            });
        }
        Ok(Self {
            _dir: dir,
            journal: None,
        })
    }
}

/// The key and value sizes of each pinned map, as this build's object defines them.
pub fn expected_layout() -> Vec<(&'static str, u32, u32)> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).ok();
    PINNED_MAPS
        .iter()
        .filter_map(|name| {
            let m = obj.as_ref()?.maps.get(*name)?;
            Some((*name, m.key_size(), m.value_size()))
        })
        .collect()
}

/// Refuses to start on maps pinned by a build whose layout differs under the same name
/// (a layout change always takes a new map name, `_V<n>`; this catches a build that
/// forgot to): reading them with this build's types would misread every entry.
fn check_pinned_layout(pin_dir: &Path) -> Result<(), LoadError> {
    for (name, key, value) in expected_layout() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| LoadError::Layout {
            path: path.clone(),
            why: format!("cannot read it: {e}"),
        })?;
        if (info.key_size(), info.value_size()) != (key, value) {
            return Err(LoadError::Layout {
                path,
                why: format!(
                    "it holds {}-byte keys and {}-byte values, this build expects {key} and {value}",
                    info.key_size(),
                    info.value_size()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses to start when a `--max-*` flag asks for another size than a map pinned under
/// `pin_dir` has: a pinned map keeps the size it was made with, and resizing one means
/// making it anew, which cuts the connections it tracks. The error says how.
fn check_pinned_sizes(pin_dir: &Path, sizes: &MapSizes) -> Result<(), LoadError> {
    for (name, want) in sizes.entries() {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue; // Not pinned (made now) or unreadable (the load says why).
        };
        if info.max_entries() != want {
            return Err(LoadError::Size {
                path,
                pinned: info.max_entries(),
                want,
                flag: MapSizes::flag_of(name),
            });
        }
    }
    Ok(())
}

/// Unpins maps of an older layout (`LB_*` names this build does not use): the programs
/// that used them have just been replaced.
fn remove_stale_maps(pin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with("LB_") && !PINNED_MAPS.contains(&file.as_str()) {
            tracing::info!(map = %file, "removing a map of an older layout");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Where a cgroup link is pinned: `<pin dir>/links/<program>_cg<cgroup id>`.
fn cgroup_link_pin(pin_dir: &Path, name: &str, cgroup_id: u64) -> PathBuf {
    pin_dir.join("links").join(format!("{name}_cg{cgroup_id}"))
}

/// Attaches every sock_addr program to `cgroup` through a link pinned under `pin_dir`,
/// so the programs stay attached while no agent runs (a crash, SIGTERM, an upgrade). A
/// link already pinned there gets the new program in place (`BPF_LINK_UPDATE`): the hook
/// never runs without a program, so a restart or an upgrade drops no connection.
/// Returns the cgroup's id ([`PinLock::started`] then unpins the links of another
/// cgroup, an earlier `--cgroup`, which detaches them).
pub fn attach_cgroup(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    cgroup_path: &Path,
    cgroup: &File,
) -> Result<u64, LoadError> {
    let cg_err = |why: String| LoadError::Cgroup {
        path: cgroup_path.to_path_buf(),
        why,
        hint: String::new(),
    };
    let cgroup_id = sys::cgroup_id(cgroup_path).map_err(|e| cg_err(e.to_string()))?;
    std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| LoadError::PinPath {
        path: pin_dir.to_path_buf(),
        why: format!("creating links/: {e}"),
    })?;
    // Every program through the verifier before the first is attached: a refusal leaves
    // the cgroup's links as they were.
    load_cgroup_programs(ebpf)?;
    let (mut updated, mut attached) = (0, 0);
    for name in CGROUP_PROGRAMS {
        let path = cgroup_link_pin(pin_dir, name, cgroup_id);
        let pin_err = |why: String| LoadError::PinLink {
            iface: cgroup_path.display().to_string(),
            name,
            path: path.clone(),
            why,
        };
        let program = ebpf.program_mut(name).ok_or(LoadError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?;
        let link = match program {
            aya::programs::Program::CgroupSockAddr(p) => attach_one(p, name, &path, cgroup)?,
            aya::programs::Program::CgroupSock(p) => attach_one(p, name, &path, cgroup)?,
            _ => {
                return Err(LoadError::Program {
                    name,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                });
            }
        };
        match link {
            None => updated += 1,
            Some(link) => {
                link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
                attached += 1;
            }
        }
    }
    tracing::info!(updated, attached, cgroup = %cgroup_path.display(), "cgroup links pinned under {}", pin_dir.join("links").display());
    Ok(cgroup_id)
}

/// Loads every cgroup program (each verified by the kernel).
fn load_cgroup_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in CGROUP_PROGRAMS {
        let loaded = match ebpf.program_mut(name) {
            Some(aya::programs::Program::CgroupSockAddr(p)) => p.load(),
            Some(aya::programs::Program::CgroupSock(p)) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        loaded.map_err(|e| load_error(name, e))?;
    }
    Ok(())
}

/// How many lines of the verifier's output an error quotes.
const VERIFIER_LINES: usize = 6;

/// `source`, an error of loading program `name`, as the agent reports it: a refusal
/// names the program and quotes the verifier's last lines (the whole output is logged
/// at debug level).
pub fn load_error(name: &'static str, source: aya::programs::ProgramError) -> LoadError {
    match source {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!(program = name, "the verifier's output:\n{log}");
            LoadError::Verifier {
                name,
                errno: io_error,
                last: last_lines(&log, VERIFIER_LINES),
            }
        }
        source => LoadError::Program { name, source },
    }
}

/// The last `n` lines of `log` that are not blank, indented.
fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "  (none)".into();
    }
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What [`attach_one`] needs of a cgroup program (sock_addr or sock).
trait CgroupProgram {
    fn prog_fd(&self) -> Result<&aya::programs::ProgramFd, aya::programs::ProgramError>;
    /// Attaches to `cgroup` and takes the new link out of the program's keeping.
    fn attach_link(&mut self, cgroup: &File) -> Result<FdLink, aya::programs::ProgramError>;
}

macro_rules! cgroup_program {
    ($ty:ty) => {
        impl CgroupProgram for $ty {
            fn prog_fd(&self) -> Result<&aya::programs::ProgramFd, aya::programs::ProgramError> {
                self.fd()
            }
            fn attach_link(
                &mut self,
                cgroup: &File,
            ) -> Result<FdLink, aya::programs::ProgramError> {
                // With bpf_link (kernel >= 5.7) the kernel always attaches in multi mode
                // and rejects explicit flags; `Single` passes none.
                let id = self.attach(cgroup, CgroupAttachMode::Single)?;
                self.take_link(id)?.try_into().map_err(|e: LinkError| {
                    aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
                })
            }
        }
    };
}
cgroup_program!(CgroupSockAddr);
cgroup_program!(CgroupSock);

/// Puts one loaded cgroup program on the cgroup: into the link pinned at `path`
/// if there is one (`None` returned: nothing to pin), else through a new link, returned
/// to be pinned.
fn attach_one(
    prog: &mut impl CgroupProgram,
    name: &'static str,
    path: &Path,
    cgroup: &File,
) -> Result<Option<FdLink>, LoadError> {
    let perr = |source| LoadError::Program { name, source };
    if path.exists() {
        let prog_fd = prog.prog_fd().map_err(perr)?.as_fd();
        match sys::obj_get(path).and_then(|link| sys::link_update(link.as_fd(), prog_fd)) {
            Ok(()) => return Ok(None),
            Err(e) => {
                tracing::warn!(link = %path.display(), "cannot update the pinned link in place ({e}): attaching anew");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    prog.attach_link(cgroup).map(Some).map_err(perr)
}

/// Unpins (so detaches) the cgroup links of other cgroups than `cgroup_id`.
fn remove_stale_cgroup_links(pin_dir: &Path, cgroup_id: u64) {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let ours = CGROUP_PROGRAMS.iter().any(|p| {
            file.strip_prefix(p)
                .is_some_and(|rest| rest.starts_with("_cg"))
        });
        let current = CGROUP_PROGRAMS
            .iter()
            .any(|p| cgroup_link_pin(pin_dir, p, cgroup_id).ends_with(&file));
        if ours && !current {
            tracing::info!(link = %file, "detaching a link of a cgroup no longer used");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Where the tc links are pinned: `<pin dir>/links/<program>_<interface>`.
fn link_pin(pin_dir: &Path, name: &str, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{name}_{iface}"))
}

/// Without TCX the tc programs are filters of a clsact qdisc, always at this priority
/// (1: before any other filter) and handle ("LB"), so that a new start finds its
/// predecessor's filter and replaces its program in place, as `tc filter replace` does.
pub const TC_FILTER_PRIORITY: u16 = 1;
pub const TC_FILTER_HANDLE: u32 = 0x4c42;

/// Clsact filters (kernels without TCX) that a start created: each tc program's link.
pub type NewFilters = Vec<(&'static str, SchedClassifierLinkId)>;

/// Leaves the filters `new` attached when `ebpf` drops (the agent exits): the next start
/// replaces their programs in place.
pub fn keep_filters(ebpf: &mut Ebpf, new: NewFilters) {
    for (name, id) in new {
        let prog: Option<&mut SchedClassifier> =
            ebpf.program_mut(name).and_then(|p| p.try_into().ok());
        if let Some(link) = prog.and_then(|p| p.take_link(id).ok()) {
            // Dropping the link would delete the filter.
            std::mem::forget(link);
        }
    }
}

/// Loads the tc programs and attaches them to every interface in `ifaces`. With TCX
/// (probed; kernel 6.6+) each link is pinned under `pin_dir`, so the programs stay
/// attached while no agent runs; a link found pinned there is updated to the new
/// program in one step (an upgrade or restart drops nothing). Without TCX they go on a
/// clsact qdisc (the start said so once) at [`TC_FILTER_PRIORITY`] and
/// [`TC_FILTER_HANDLE`], where they stay when the agent exits; the next start replaces
/// the program of that filter in place, so that nothing drops there either; the filters
/// it created are returned, for [`keep_filters`] once the start has succeeded (until
/// then dropping `ebpf` detaches them). Our tc programs anywhere else (interfaces no
/// longer served, another way of attaching) are removed once the new ones are attached.
/// A kernel that lacks a feature the tc programs need is refused, naming it.
pub fn attach_tc(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    ifaces: &[Iface],
) -> Result<NewFilters, LoadError> {
    let tcx = checks::has(checks::TCX);
    let Some(first) = ifaces.first() else {
        remove_stale_links(pin_dir, ifaces);
        remove_filters(&[]);
        return Ok(Vec::new());
    };
    let missing = checks::missing(checks::Need::PacketLevel);
    if !missing.is_empty() {
        return Err(LoadError::PacketLevel {
            iface: first.name.clone(),
            missing: checks::describe(&missing),
            measured: checks::MEASURED,
        });
    }
    if !tcx {
        for i in ifaces {
            // An existing clsact qdisc is fine.
            if let Err(e) = tc::qdisc_add_clsact(&i.name)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                tracing::warn!(iface = %i.name, "adding a clsact qdisc: {e}");
            }
        }
    }
    let mut created = Vec::new();
    for (name, attach_type) in TC_PROGRAMS {
        let perr = |source| LoadError::Program { name, source };
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| perr(aya::programs::ProgramError::UnexpectedProgramType))?
            .try_into()
            .map_err(perr)?;
        // Loaded once; a later call (the node's addresses changed) only re-attaches.
        if prog.fd().is_err() {
            prog.load().map_err(|e| load_error(name, e))?;
        }
        for i in ifaces {
            if tcx {
                attach_tcx(prog, pin_dir, name, attach_type, i)?;
            } else if let Some(id) = attach_filter(prog, name, attach_type, i)? {
                created.push((name, id));
            }
        }
    }
    if tcx {
        remove_stale_links(pin_dir, ifaces);
        remove_filters(&[]);
    } else {
        // Links of TCX (a start that had it) would run the programs twice.
        remove_stale_links(pin_dir, &[]);
        remove_filters(ifaces);
    }
    Ok(created)
}

/// Attaches `prog` to `iface` through a TCX link pinned under `pin_dir`, or updates the
/// pinned link to `prog`.
fn attach_tcx(
    prog: &mut SchedClassifier,
    pin_dir: &Path,
    name: &'static str,
    attach_type: TcAttachType,
    iface: &Iface,
) -> Result<(), LoadError> {
    let attach_err = |source| LoadError::Attach {
        iface: iface.name.clone(),
        name,
        source,
    };
    let path = link_pin(pin_dir, name, &iface.name);
    let pin_err = |why: String| LoadError::PinLink {
        iface: iface.name.clone(),
        name,
        path: path.clone(),
        why,
    };
    let id = match PinnedLink::from_pin(&path) {
        Ok(old) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|e: LinkError| pin_err(format!("adopting it: {e}")))?;
            prog.attach_to_link(link).map_err(attach_err)?
        }
        Err(_) => {
            let first = TcAttachOptions::TcxOrder(LinkOrder::default());
            prog.attach_with_options(&iface.name, attach_type, first)
                .map_err(attach_err)?
        }
    };
    let link: FdLink = prog
        .take_link(id)
        .map_err(attach_err)?
        .try_into()
        .map_err(|e: LinkError| pin_err(e.to_string()))?;
    std::fs::create_dir_all(pin_dir.join("links")).map_err(|e| pin_err(e.to_string()))?;
    let _ = std::fs::remove_file(&path);
    link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
    Ok(())
}

/// Attaches `prog` to `iface`'s clsact qdisc as the filter at [`TC_FILTER_PRIORITY`] and
/// [`TC_FILTER_HANDLE`], replacing the program of that filter in place when it is there
/// (a restart: no packet meets the qdisc without one; that filter stays when the agent
/// exits). A filter it creates is returned, its link left with `prog` (see
/// [`keep_filters`]). Our filters elsewhere on the qdisc (left by an older version,
/// which let the kernel choose) are removed. A filter of another name at that place is
/// not replaced.
fn attach_filter(
    prog: &mut SchedClassifier,
    name: &'static str,
    attach_type: TcAttachType,
    iface: &Iface,
) -> Result<Option<SchedClassifierLinkId>, LoadError> {
    let attach_err = |source| LoadError::Attach {
        iface: iface.name.clone(),
        name,
        source,
    };
    let netlink_err = |e: std::io::Error| attach_err(tc::TcError::IoError(e).into());
    let filters = tcfilter::list(iface.ifindex, attach_type).map_err(netlink_err)?;
    let ours =
        |f: &&tcfilter::Filter| (f.priority, f.handle) == (TC_FILTER_PRIORITY, TC_FILTER_HANDLE);
    let created = match filters.iter().find(ours) {
        Some(f) if f.name != name => {
            return Err(netlink_err(std::io::Error::other(format!(
                "the clsact filter at priority {TC_FILTER_PRIORITY} handle {TC_FILTER_HANDLE:#x} is {:?} (program {}), not ours: remove it (`tc filter del dev {} {} pref {TC_FILTER_PRIORITY}`)",
                f.name,
                f.prog_id,
                iface.name,
                direction(attach_type),
            ))));
        }
        Some(_) => {
            let link = SchedClassifierLink::attached(
                &iface.name,
                attach_type,
                TC_FILTER_PRIORITY,
                TC_FILTER_HANDLE.into(),
                None,
            )
            .map_err(netlink_err)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            // An earlier start's filter: it stays, whatever becomes of this start.
            std::mem::forget(prog.take_link(id).map_err(attach_err)?);
            None
        }
        None => {
            let at = TcAttachOptions::Netlink(NlOptions {
                priority: TC_FILTER_PRIORITY,
                handle: TC_FILTER_HANDLE.into(),
                classid: None,
            });
            Some(
                prog.attach_with_options(&iface.name, attach_type, at)
                    .map_err(attach_err)?,
            )
        }
    };
    for f in filters.iter().filter(|f| f.name == name && !ours(f)) {
        let _ = remove_filter(&iface.name, attach_type, f);
    }
    Ok(created)
}

fn direction(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// Deletes the clsact filter `f` (one of ours) from `iface`, saying so; whether it did.
fn remove_filter(iface: &str, attach_type: TcAttachType, f: &tcfilter::Filter) -> bool {
    use aya::programs::links::Link as _;
    let detached =
        SchedClassifierLink::attached(iface, attach_type, f.priority, f.handle.into(), None)
            .map_err(aya::programs::ProgramError::from)
            .and_then(|l| l.detach());
    match &detached {
        Ok(()) => tracing::info!(
            iface,
            filter = %f.name,
            priority = f.priority,
            handle = f.handle,
            "removed a tc filter of ours from a clsact qdisc"
        ),
        Err(e) => tracing::warn!(
            iface,
            filter = %f.name,
            priority = f.priority,
            handle = f.handle,
            "removing a tc filter of ours from a clsact qdisc: {e}"
        ),
    }
    detached.is_ok()
}

/// Removes our tc programs' clsact filters from every interface of this network
/// namespace that is not in `keep`; returns how many it removed.
fn remove_filters(keep: &[Iface]) -> usize {
    let mut removed = 0;
    for (ifindex, iface) in tcfilter::interfaces() {
        if keep.iter().any(|i| i.ifindex == ifindex) {
            continue;
        }
        for (name, attach_type) in TC_PROGRAMS {
            let Ok(filters) = tcfilter::list(ifindex, attach_type) else {
                continue;
            };
            for f in filters.iter().filter(|f| f.name == name) {
                removed += usize::from(remove_filter(&iface, attach_type, f));
            }
        }
    }
    removed
}

/// Where an XDP link is pinned: `<pin dir>/links/lb_xdp_<mode>_<interface>`.
fn xdp_link_pin(pin_dir: &Path, mode: Acceleration, iface: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{XDP_PROGRAM}_{}_{iface}", mode.name()))
}

/// The interfaces with the XDP program attached under `pin_dir`, and the mode each got
/// (from the link pins, `lb_xdp_<mode>_<interface>`), sorted by interface.
pub fn xdp_modes(pin_dir: &Path) -> Vec<(String, &'static str)> {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    let mut modes: Vec<(String, &'static str)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let rest = file.strip_prefix(XDP_PROGRAM)?.strip_prefix('_')?;
            [Acceleration::Native, Acceleration::Generic]
                .into_iter()
                .find_map(|mode| {
                    let iface = rest.strip_prefix(mode.name())?.strip_prefix('_')?;
                    Some((iface.to_string(), mode.name()))
                })
        })
        .collect();
    modes.sort();
    modes
}

/// Which object's programs are attached under `pin_dir`: read from the connect4
/// program of a cgroup link pinned there (the maps it uses); `None` when no such link
/// can be read.
pub fn attached_object(pin_dir: &Path) -> Option<EbpfObject> {
    let links = std::fs::read_dir(pin_dir.join("links")).ok()?;
    let pin = links.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix(PROGRAMS[0]))
            .is_some_and(|rest| rest.starts_with("_cg"))
    })?;
    let prog_id = sys::link_info(sys::obj_get(&pin).ok()?.as_fd())
        .ok()?
        .prog_id;
    let prog = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog_id)?;
    let degraded = prog.map_ids().ok()??.into_iter().any(|id| {
        aya::maps::MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(NO_SET_RETVAL_MAP))
    });
    Some(EbpfObject::for_kernel(!degraded))
}

/// Attaches the XDP program to every interface in `ifaces` as `accel` says, through a
/// link pinned under `pin_dir` (a link found pinned there gets the new program in one
/// step); returns the mode each interface got (`native` falls back to `generic` where
/// the driver has no XDP). XDP links of other interfaces or another mode are unpinned,
/// which detaches them: tc handles everything XDP would, so nothing drops meanwhile.
/// `Off` only unpins, and so does a kernel that lacks a feature of the XDP program
/// (said in a warning).
pub fn attach_xdp(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    ifaces: &[Iface],
    accel: Acceleration,
) -> Result<Vec<(String, Acceleration)>, LoadError> {
    let mut got = Vec::new();
    let missing = checks::missing(checks::Need::Xdp);
    let accel = if accel != Acceleration::Off && !missing.is_empty() {
        tracing::warn!(
            "--acceleration {}: this kernel lacks {}; XDP stays off, tc handles the packet level",
            accel.name(),
            checks::describe(&missing)
        );
        Acceleration::Off
    } else {
        accel
    };
    if accel != Acceleration::Off && !ifaces.is_empty() {
        let perr = |source| LoadError::Program {
            name: XDP_PROGRAM,
            source,
        };
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| perr(aya::programs::ProgramError::UnexpectedProgramType))?
            .try_into()
            .map_err(perr)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| load_error(XDP_PROGRAM, e))?;
        }
        for i in ifaces {
            got.push((i.name.clone(), attach_xdp_one(prog, pin_dir, i, accel)?));
        }
    }
    let wanted: Vec<PathBuf> = got
        .iter()
        .map(|(name, mode)| xdp_link_pin(pin_dir, *mode, name))
        .collect();
    let prefix = format!("{XDP_PROGRAM}_");
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix) && !wanted.iter().any(|w| w.ends_with(&file)) {
                tracing::info!(link = %file, "detaching an XDP link no longer wanted");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(got)
}

/// Attaches `prog` to `iface` (see [`attach_xdp`]); the mode it got.
fn attach_xdp_one(
    prog: &mut Xdp,
    pin_dir: &Path,
    iface: &Iface,
    accel: Acceleration,
) -> Result<Acceleration, LoadError> {
    let attach_err = |source| LoadError::Attach {
        iface: iface.name.clone(),
        name: XDP_PROGRAM,
        source,
    };
    // A link pinned in a mode this start may keep: native asked, generic got before (the
    // driver has no native XDP: a native attach would fail while it is there).
    let keep: &[Acceleration] = match accel {
        Acceleration::Native => &[Acceleration::Native, Acceleration::Generic],
        _ => &[Acceleration::Generic],
    };
    let adopted = keep.iter().find_map(|m| {
        let path = xdp_link_pin(pin_dir, *m, &iface.name);
        PinnedLink::from_pin(&path).ok().map(|l| (*m, path, l))
    });
    let (mode, path, id) = match adopted {
        Some((mode, path, old)) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|e: LinkError| xdp_pin_err(iface, &path, format!("adopting it: {e}")))?;
            (mode, path, prog.attach_to_link(link).map_err(attach_err)?)
        }
        None => {
            let native = (accel == Acceleration::Native)
                .then(|| prog.attach_to_if_index(iface.ifindex, XdpMode::Driver));
            match native {
                Some(Ok(id)) => (
                    Acceleration::Native,
                    xdp_link_pin(pin_dir, Acceleration::Native, &iface.name),
                    id,
                ),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::info!(iface = %iface.name, "no native XDP ({e}): generic XDP");
                    }
                    let id = prog
                        .attach_to_if_index(iface.ifindex, XdpMode::Skb)
                        .map_err(attach_err)?;
                    (
                        Acceleration::Generic,
                        xdp_link_pin(pin_dir, Acceleration::Generic, &iface.name),
                        id,
                    )
                }
            }
        }
    };
    let link: FdLink = prog
        .take_link(id)
        .map_err(attach_err)?
        .try_into()
        .map_err(|e: LinkError| xdp_pin_err(iface, &path, e.to_string()))?;
    std::fs::create_dir_all(pin_dir.join("links"))
        .map_err(|e| xdp_pin_err(iface, &path, e.to_string()))?;
    let _ = std::fs::remove_file(&path);
    link.pin(&path)
        .map_err(|e| xdp_pin_err(iface, &path, e.to_string()))?;
    Ok(mode)
}

fn xdp_pin_err(iface: &Iface, path: &Path, why: String) -> LoadError {
    LoadError::PinLink {
        iface: iface.name.clone(),
        name: XDP_PROGRAM,
        path: path.to_path_buf(),
        why,
    }
}

/// Unpins (so detaches) the tc links of interfaces that are no longer in `ifaces`.
fn remove_stale_links(pin_dir: &Path, ifaces: &[Iface]) {
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !TC_PROGRAMS.iter().any(|(name, _)| file.starts_with(name)) {
            continue;
        }
        let wanted = TC_PROGRAMS.iter().any(|(name, _)| {
            ifaces
                .iter()
                .any(|i| link_pin(pin_dir, name, &i.name).ends_with(&file))
        });
        if !wanted {
            tracing::info!(link = %file, "detaching a tc link of an interface no longer used");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Each of our programs linked under `pin_dir` (cgroup and tc links), with its run time
/// and run count from the kernel's BPF statistics, summed over its links (one tc program
/// per interface): zero unless statistics are on (`--bpf-stats`, or the sysctl
/// `kernel.bpf_stats_enabled`). Reading other programs' info needs CAP_SYS_ADMIN.
pub fn program_stats(
    pin_dir: &Path,
) -> std::io::Result<Vec<(&'static str, std::time::Duration, u64)>> {
    let mut ids: Vec<(&'static str, u32)> = Vec::new();
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let path = entry?.path();
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let tc = TC_PROGRAMS.iter().map(|(n, _)| *n);
        let Some(name) = CGROUP_PROGRAMS.into_iter().chain(tc).find(|p| {
            file.strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('_'))
        }) else {
            continue;
        };
        let link = sys::obj_get(&path)?;
        ids.push((name, sys::link_info(link.as_fd())?.prog_id));
    }
    let mut stats: Vec<(&'static str, std::time::Duration, u64)> = Vec::new();
    for info in aya::programs::loaded_programs().flatten() {
        for (name, _) in ids.iter().filter(|(_, id)| *id == info.id()) {
            match stats.iter_mut().find(|(n, _, _)| n == name) {
                Some((_, t, c)) => {
                    *t += info.run_time();
                    *c += info.run_count();
                }
                None => stats.push((name, info.run_time(), info.run_count())),
            }
        }
    }
    Ok(stats)
}

/// `lb-user cleanup`: removes the pins under `pin_dir` (maps, and links, which detaches
/// their programs), our tc programs' clsact filters in this network namespace (kernels
/// without TCX) and, with `cgroup`, detaches any link of ours still on that cgroup
/// (one whose pin was lost). Says what it did.
pub fn cleanup(pin_dir: &Path, cgroup: Option<&Path>) -> anyhow::Result<String> {
    use anyhow::Context as _;
    if std::fs::symlink_metadata(pin_dir).is_ok() {
        // Only pins are removed: never files of another filesystem.
        let why = match fs_magic(pin_dir) {
            _ if std::fs::symlink_metadata(pin_dir).is_ok_and(|m| m.file_type().is_symlink()) => {
                Some("it is a symlink: give the directory itself")
            }
            Some(BPF_FS_MAGIC) => None,
            _ => Some("not on a bpf filesystem; cleanup removes only pins and leaves it alone"),
        };
        if let Some(why) = why {
            anyhow::bail!("--pin-path {}: {why}", pin_dir.display());
        }
    }
    // Not under a running agent.
    let _lock = if pin_dir.is_dir() {
        Some(PinLock::take(pin_dir)?)
    } else {
        None
    };
    let pins = std::fs::read_dir(pin_dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    let maps = PINNED_MAPS
        .iter()
        .filter(|m| pin_dir.join(m).exists())
        .count();
    remove_pins(pin_dir);
    // Without TCX the tc programs are clsact filters, with no pin: this namespace's go.
    let filters = remove_filters(&[]);
    let mut report = format!(
        "{}: removed {maps} map pins and {pins} link pins; {filters} tc filters removed from clsact qdiscs",
        pin_dir.display()
    );
    if let Some(cg) = cgroup {
        let id = sys::cgroup_id(cg).with_context(|| format!("--cgroup {}", cg.display()))?;
        let ours: Vec<u32> = aya::programs::loaded_programs()
            .flatten()
            .filter(|p| {
                p.name_as_str()
                    .filter(|n| n.len() > 3)
                    .is_some_and(|n| CGROUP_PROGRAMS.iter().any(|ours| ours.starts_with(n)))
            })
            .map(|p| p.id())
            .collect();
        let mut detached = 0;
        for (info, fd) in sys::cgroup_links(id).context("listing the links of the cgroup")? {
            if ours.contains(&info.prog_id) {
                sys::link_detach(fd.as_fd())
                    .with_context(|| format!("detaching link {} from {}", info.id, cg.display()))?;
                detached += 1;
            }
        }
        report.push_str(&format!(
            "; {}: detached {detached} more links",
            cg.display()
        ));
    }
    Ok(report)
}

/// Removes the pinned maps and links (which detaches the programs) and the pin
/// directory if it is then empty.
pub fn remove_pins(pin_dir: &Path) {
    for m in PINNED_MAPS {
        let _ = std::fs::remove_file(pin_dir.join(m));
    }
    // And maps of older layouts.
    remove_stale_maps(pin_dir);
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(pin_dir.join("links"));
    let _ = std::fs::remove_dir(pin_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_modes_are_read_from_the_link_pins() {
        let dir = std::env::temp_dir().join(format!("lb-xdp-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("links")).unwrap();
        for f in [
            "lb_xdp_native_eth1",
            "lb_xdp_generic_eth0",
            "lb_tc_ingress_eth0",
            "lb_xdp_off_eth2",
        ] {
            std::fs::write(dir.join("links").join(f), "").unwrap();
        }
        assert_eq!(
            xdp_modes(&dir),
            [
                ("eth0".to_string(), "generic"),
                ("eth1".to_string(), "native")
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(xdp_modes(&dir).is_empty());
    }

    #[test]
    fn the_layout_check_knows_every_pinned_map_with_the_shared_types_sizes() {
        let layout = expected_layout();
        assert_eq!(layout.len(), PINNED_MAPS.len(), "{layout:?}");
        let size = |name: &str| {
            layout
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, k, v)| (*k as usize, *v as usize))
        };
        use lb_common::{CtKey, CtValue};
        assert_eq!(
            size(lb_common::MAP_CT),
            Some((size_of::<CtKey>(), size_of::<CtValue>()))
        );
    }

    #[test]
    fn a_pin_dir_without_maps_passes_the_layout_check_and_stale_maps_go() {
        let dir = std::env::temp_dir().join(format!("lb-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(check_pinned_layout(&dir).is_ok());
        // A map name of an older layout is removed, anything else is left alone.
        std::fs::write(dir.join("LB_COUNTERS_V1"), "").unwrap();
        std::fs::write(dir.join("notes"), "").unwrap();
        remove_stale_maps(&dir);
        assert!(!dir.join("LB_COUNTERS_V1").exists());
        assert!(dir.join("notes").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cgroup_link_pins_are_told_apart_from_tc_link_pins() {
        let dir = std::env::temp_dir().join(format!("lb-links-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("links")).unwrap();
        for f in ["lb_connect4_cg7", "lb_connect4_cg9", "lb_tc_ingress_eth0"] {
            std::fs::write(dir.join("links").join(f), "").unwrap();
        }
        remove_stale_cgroup_links(&dir, 9);
        let left: Vec<String> = std::fs::read_dir(dir.join("links"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.contains(&"lb_connect4_cg9".to_string()), "{left:?}");
        assert!(left.contains(&"lb_tc_ingress_eth0".to_string()), "{left:?}");
        assert!(!left.contains(&"lb_connect4_cg7".to_string()), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_start_removes_only_the_pins_it_made() {
        let dir = std::env::temp_dir().join(format!("lb-journal-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("links")).unwrap();
        // An earlier agent's pins.
        for f in ["LB_SERVICES_V1", "links/lb_connect4_cg7"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let journal = StartJournal::record(&dir, true);
        for f in ["LB_CT_V1", "links/lb_tc_ingress_eth0"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        assert_eq!(journal.roll_back(), 2);
        let left: Vec<PathBuf> = pins_under(&dir).into_iter().collect();
        assert_eq!(
            left,
            vec![
                dir.join("LB_SERVICES_V1"),
                dir.join("links/lb_connect4_cg7")
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();

        // A pin directory the start made goes with its pins.
        let fresh = StartJournal::record(&dir, false);
        std::fs::create_dir_all(dir.join("links")).unwrap();
        std::fs::write(dir.join("links/lb_connect4_cg7"), "").unwrap();
        std::fs::write(dir.join("LB_CT_V1"), "").unwrap();
        assert_eq!(fresh.roll_back(), 2);
        assert!(!dir.exists());
    }

    #[test]
    fn a_verifier_refusal_names_the_program_and_quotes_the_last_lines() {
        let log = "0: (bf) r6 = r1\n1: (85) call pc+12\n2: (b7) r0 = 0\n3: (95) exit\n\ncombined stack size of 6 calls is 544. Too large\nverification time 1234 usec\nstack depth 64+96+128+64+96+96\nprocessed 1234 insns (limit 1000000) max_states_per_insn 4 total_states 98 peak_states 98 mark_read 12\n";
        let err = load_error(
            "lb_tc_ingress",
            aya::programs::ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(libc::EACCES),
                verifier_log: aya_obj::VerifierLog::new(log.into()),
            },
        )
        .to_string();
        assert!(
            err.starts_with("program lb_tc_ingress: the kernel refused to load it ("),
            "{err}"
        );
        assert!(
            err.contains("\n  combined stack size of 6 calls is 544. Too large\n"),
            "{err}"
        );
        assert!(err.contains("  processed 1234 insns"), "{err}");
        // Only the last lines.
        assert!(!err.contains("r6 = r1"), "{err}");
        assert_eq!(last_lines("", 6), "  (none)");
    }
}
