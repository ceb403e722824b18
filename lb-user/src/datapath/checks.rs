//! Startup checks: what the agent needs of its process and of the kernel, each failing
//! with an error that names what is missing and how to get it, before anything loads.

use std::sync::Mutex;

use Need::{Fallback, PacketLevel, Start};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, BpfHelper as H, is_helper_supported, is_map_supported, is_program_supported},
};
use aya_obj::generated::{bpf_attach_type as at, bpf_prog_type as pt};

/// Linux capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capabilities of this process (`CapEff` of /proc/self/status).
pub fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loading and attaching needs CAP_BPF (maps, programs, links), CAP_PERFMON (the
/// verifier lets programs follow kernel pointers and do the pointer arithmetic ours do
/// only with it) and CAP_NET_ADMIN (cgroup socket and tc programs, netlink, sysctls);
/// CAP_SYS_ADMIN covers the first two. Checked before anything is pinned, each missing
/// one named.
pub fn check_capabilities(effective: u64) -> Result<(), String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this process lacks {} (effective capabilities {effective:#x}): run the agent as root, \
         or grant them (the DaemonSet in manifests/deploy does)",
        missing.join(", ")
    ))
}

/// What closing the sockets translated to a backend that left needs, and `effective`
/// lacks: to open other processes' /proc/PID/ns/net (CAP_SYS_PTRACE) and to enter
/// those namespaces (CAP_SYS_ADMIN). Without them the agent runs, and such sockets stay
/// open until the application closes them.
pub fn socket_closer_missing(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE (to open other processes' /proc/PID/ns/net)");
    }
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (to enter their network namespaces)");
    }
    missing
}

/// How the presence of a kernel feature is probed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// A cgroup program of `prog_type` loaded for `attach_type` (`expected_attach_type`).
    Attach(u32, u32),
    /// Cgroup programs attached through a bpf_link (pinned, so they outlive the agent).
    CgroupLink,
    /// tc programs attached through TCX links.
    Tcx,
}

/// What the agent does on a kernel that lacks a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The socket-level programs cannot load: the agent refuses to start.
    Start,
    /// The tc programs cannot load: the packet level stays off and `--interface` is
    /// refused; the socket level works.
    PacketLevel,
    /// The XDP program cannot load: `--acceleration native|generic` stays off (with a
    /// warning when asked for) and tc handles the whole packet level.
    Xdp,
    /// The agent does without it, as said.
    Fallback(&'static str),
}

/// One kernel feature the programs use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Feature {
    /// The `name` label of `lb_kernel_feature`.
    pub name: &'static str,
    /// What it is, as the log and errors name it.
    pub what: &'static str,
    /// The kernel release that brought it (upstream).
    pub since: &'static str,
    pub probe: Probe,
    pub need: Need,
}

/// Without TCX the tc programs go on a clsact qdisc (as Cilium does).
pub const TCX: &str = "tcx";
/// Without `bpf_set_retval` in sock_addr programs the agent loads its object built
/// without it (`loader::EbpfObject::NoSetRetval`).
pub const SET_RETVAL: &str = "helper_set_retval";

/// What a client sees differently with the object built without `bpf_set_retval`.
const WITHOUT_SET_RETVAL: &str = "the socket level runs its programs built without it, \
     and what a client sees changes: connect() to a Service without endpoints fails with \
     EPERM instead of ECONNREFUSED (EPERM instead of EHOSTUNREACH where a \
     traffic policy Local leaves no endpoint on this node), and so does sendmsg() of an \
     unconnected UDP socket to one; translation to endpoints is unchanged";

const fn feature(
    name: &'static str,
    what: &'static str,
    since: &'static str,
    probe: Probe,
    need: Need,
) -> Feature {
    Feature {
        name,
        what,
        since,
        probe,
        need,
    }
}

const SOCK: ProgramType = ProgramType::CgroupSockAddr;
const SOCK_REL: ProgramType = ProgramType::CgroupSock;
const TC: ProgramType = ProgramType::SchedClassifier;
const XDP: ProgramType = ProgramType::Xdp;
const SOCK_ADDR: u32 = pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;

/// Everything the programs need of the kernel: each program type, attach type, map type
/// and helper they use, with the kernel release that brought it.
pub const FEATURES: &[Feature] = &[
    feature(
        "prog_cgroup_sock_addr",
        "cgroup/sock_addr programs",
        "4.17",
        Probe::Program(SOCK),
        Start,
    ),
    feature(
        "prog_cgroup_sock",
        "cgroup/sock programs",
        "4.10",
        Probe::Program(SOCK_REL),
        Start,
    ),
    feature(
        "attach_connect",
        "the cgroup connect4/connect6 hooks",
        "4.17",
        Probe::Attach(SOCK_ADDR, at::BPF_CGROUP_INET4_CONNECT as u32),
        Start,
    ),
    feature(
        "attach_sendmsg",
        "the cgroup sendmsg4/sendmsg6 hooks",
        "4.18",
        Probe::Attach(SOCK_ADDR, at::BPF_CGROUP_UDP4_SENDMSG as u32),
        Start,
    ),
    feature(
        "attach_recvmsg",
        "the cgroup recvmsg4/recvmsg6 hooks",
        "5.2",
        Probe::Attach(SOCK_ADDR, at::BPF_CGROUP_UDP4_RECVMSG as u32),
        Start,
    ),
    feature(
        "attach_getpeername",
        "the cgroup getpeername4/getpeername6 hooks",
        "5.8",
        Probe::Attach(SOCK_ADDR, at::BPF_CGROUP_INET4_GETPEERNAME as u32),
        Start,
    ),
    feature(
        "attach_sock_release",
        "the cgroup sock_release hook",
        "5.9",
        Probe::Attach(
            pt::BPF_PROG_TYPE_CGROUP_SOCK as u32,
            at::BPF_CGROUP_INET_SOCK_RELEASE as u32,
        ),
        Start,
    ),
    feature(
        "cgroup_link",
        "cgroup bpf_links (pinned, so the programs outlive the agent)",
        "5.7",
        Probe::CgroupLink,
        Start,
    ),
    feature(
        "map_hash",
        "hash maps",
        "3.19",
        Probe::Map(MapType::Hash),
        Start,
    ),
    feature(
        "map_lru_hash",
        "LRU hash maps",
        "4.10",
        Probe::Map(MapType::LruHash),
        Start,
    ),
    feature(
        "map_lpm_trie",
        "LPM trie maps",
        "4.11",
        Probe::Map(MapType::LpmTrie),
        Start,
    ),
    feature(
        "map_percpu_array",
        "per-CPU array maps",
        "4.6",
        Probe::Map(MapType::PerCpuArray),
        Start,
    ),
    feature(
        "map_hash_of_maps",
        "hash-of-maps maps (the Maglev tables)",
        "4.12",
        Probe::Map(MapType::HashOfMaps),
        Start,
    ),
    feature(
        "helper_get_socket_cookie",
        "bpf_get_socket_cookie in sock_addr programs",
        "5.8",
        Probe::Helper(SOCK, H::BPF_FUNC_get_socket_cookie),
        Start,
    ),
    feature(
        "helper_get_socket_cookie_sock",
        "bpf_get_socket_cookie in cgroup/sock programs",
        "5.8",
        Probe::Helper(SOCK_REL, H::BPF_FUNC_get_socket_cookie),
        Start,
    ),
    feature(
        "helper_get_netns_cookie",
        "bpf_get_netns_cookie in sock_addr programs",
        "5.8",
        Probe::Helper(SOCK, H::BPF_FUNC_get_netns_cookie),
        Start,
    ),
    feature(
        SET_RETVAL,
        "bpf_set_retval in sock_addr programs (the errno of a refused connect())",
        "6.1",
        Probe::Helper(SOCK, H::BPF_FUNC_set_retval),
        Fallback(WITHOUT_SET_RETVAL),
    ),
    feature(
        "helper_get_prandom_u32",
        "bpf_get_prandom_u32 in sock_addr programs",
        "4.17",
        Probe::Helper(SOCK, H::BPF_FUNC_get_prandom_u32),
        Start,
    ),
    feature(
        "helper_ktime_get_ns",
        "bpf_ktime_get_ns in sock_addr programs",
        "4.17",
        Probe::Helper(SOCK, H::BPF_FUNC_ktime_get_ns),
        Start,
    ),
    feature(
        "prog_sched_cls",
        "tc (sched_cls) programs",
        "4.1",
        Probe::Program(TC),
        PacketLevel,
    ),
    feature(
        TCX,
        "TCX links for tc programs",
        "6.6",
        Probe::Tcx,
        Fallback(
            "the tc programs go on clsact qdiscs as filters, which stay while no agent runs; the next start replaces their programs in place",
        ),
    ),
    feature(
        "helper_fib_lookup",
        "bpf_fib_lookup in tc programs",
        "4.18",
        Probe::Helper(TC, H::BPF_FUNC_fib_lookup),
        PacketLevel,
    ),
    feature(
        "helper_redirect_neigh",
        "bpf_redirect_neigh in tc programs",
        "5.10",
        Probe::Helper(TC, H::BPF_FUNC_redirect_neigh),
        PacketLevel,
    ),
    feature(
        "helper_check_mtu",
        "bpf_check_mtu in tc programs",
        "5.12",
        Probe::Helper(TC, H::BPF_FUNC_check_mtu),
        PacketLevel,
    ),
    feature(
        "helper_redirect",
        "bpf_redirect in tc programs",
        "4.4",
        Probe::Helper(TC, H::BPF_FUNC_redirect),
        PacketLevel,
    ),
    feature(
        "helper_l3_csum_replace",
        "bpf_l3_csum_replace in tc programs",
        "4.1",
        Probe::Helper(TC, H::BPF_FUNC_l3_csum_replace),
        PacketLevel,
    ),
    feature(
        "helper_l4_csum_replace",
        "bpf_l4_csum_replace in tc programs",
        "4.1",
        Probe::Helper(TC, H::BPF_FUNC_l4_csum_replace),
        PacketLevel,
    ),
    feature(
        "helper_skb_store_bytes",
        "bpf_skb_store_bytes in tc programs",
        "4.1",
        Probe::Helper(TC, H::BPF_FUNC_skb_store_bytes),
        PacketLevel,
    ),
    feature(
        "helper_skb_load_bytes",
        "bpf_skb_load_bytes in tc programs",
        "4.5",
        Probe::Helper(TC, H::BPF_FUNC_skb_load_bytes),
        PacketLevel,
    ),
    feature(
        "helper_skb_change_tail",
        "bpf_skb_change_tail in tc programs",
        "4.9",
        Probe::Helper(TC, H::BPF_FUNC_skb_change_tail),
        PacketLevel,
    ),
    feature(
        "prog_xdp",
        "XDP programs",
        "4.8",
        Probe::Program(XDP),
        Need::Xdp,
    ),
    feature(
        "helper_xdp_load_bytes",
        "bpf_xdp_load_bytes in XDP programs",
        "5.18",
        Probe::Helper(XDP, H::BPF_FUNC_xdp_load_bytes),
        Need::Xdp,
    ),
    feature(
        "helper_xdp_store_bytes",
        "bpf_xdp_store_bytes in XDP programs",
        "5.18",
        Probe::Helper(XDP, H::BPF_FUNC_xdp_store_bytes),
        Need::Xdp,
    ),
    feature(
        "helper_xdp_get_buff_len",
        "bpf_xdp_get_buff_len in XDP programs",
        "5.18",
        Probe::Helper(XDP, H::BPF_FUNC_xdp_get_buff_len),
        Need::Xdp,
    ),
    feature(
        "helper_xdp_adjust_head",
        "bpf_xdp_adjust_head in XDP programs",
        "4.10",
        Probe::Helper(XDP, H::BPF_FUNC_xdp_adjust_head),
        Need::Xdp,
    ),
    feature(
        "helper_xdp_adjust_tail",
        "bpf_xdp_adjust_tail in XDP programs",
        "4.18",
        Probe::Helper(XDP, H::BPF_FUNC_xdp_adjust_tail),
        Need::Xdp,
    ),
    feature(
        "helper_fib_lookup_xdp",
        "bpf_fib_lookup in XDP programs",
        "4.18",
        Probe::Helper(XDP, H::BPF_FUNC_fib_lookup),
        Need::Xdp,
    ),
    feature(
        "helper_check_mtu_xdp",
        "bpf_check_mtu in XDP programs",
        "5.12",
        Probe::Helper(XDP, H::BPF_FUNC_check_mtu),
        Need::Xdp,
    ),
    feature(
        "helper_redirect_xdp",
        "bpf_redirect in XDP programs",
        "4.14",
        Probe::Helper(XDP, H::BPF_FUNC_redirect),
        Need::Xdp,
    ),
];

/// [`FEATURES`], as a list.
pub fn needed() -> Vec<Feature> {
    FEATURES.to_vec()
}

/// What each feature probed so far answered (by name), so a feature is probed once
/// and `/metrics` can say what this kernel has.
static PROBED: Mutex<Vec<(&'static str, Result<bool, String>)>> = Mutex::new(Vec::new());

/// The features `--assume-missing-kernel-feature` names: taken as missing, whatever
/// the kernel has.
static ASSUMED_MISSING: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// `name` if it names a feature of [`FEATURES`] (`--assume-missing-kernel-feature`'s
/// parser), else an error that lists the names.
pub fn feature_name(name: &str) -> Result<&'static str, String> {
    FEATURES
        .iter()
        .find(|f| f.name == name)
        .map(|f| f.name)
        .ok_or_else(|| {
            let names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
            format!(
                "{name:?} is not a kernel feature of the agent; the names (as in lb_kernel_feature) are: {}",
                names.join(", ")
            )
        })
}

/// Makes [`probe`] answer "missing" for the features `names` (for tests and
/// diagnosis: the agent then takes the path it takes on a kernel without them), each
/// logged once. Call before the first probe.
pub fn assume_missing(names: &[&'static str]) {
    for name in names {
        tracing::warn!(
            feature = name,
            "--assume-missing-kernel-feature: {name} is taken as missing, whatever this kernel has"
        );
    }
    lock(&ASSUMED_MISSING).extend_from_slice(names);
}

/// `probe`'s answer for `f`, unless `assumed` names it: then "missing".
fn answer(
    f: Feature,
    assumed: &[&str],
    probe: impl FnOnce() -> Result<bool, String>,
) -> Result<bool, String> {
    if assumed.contains(&f.name) {
        return Ok(false);
    }
    probe()
}

/// Whether the running kernel has `f` (an error when the probe cannot tell; "no" when
/// [`assume_missing`] named it). Each feature is probed once; later calls get the first
/// answer.
pub fn probe(f: Feature) -> Result<bool, String> {
    if let Some((_, r)) = lock(&PROBED).iter().find(|(n, _)| *n == f.name) {
        return r.clone();
    }
    let assumed = lock(&ASSUMED_MISSING).clone();
    let r = answer(f, &assumed, || match f.probe {
        Probe::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
        Probe::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
        Probe::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
        Probe::Attach(prog, attach) => raw::attach_type(prog, attach),
        Probe::CgroupLink => raw::cgroup_link(),
        Probe::Tcx => raw::tcx(),
    });
    lock(&PROBED).push((f.name, r.clone()));
    r
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Each feature probed so far whose probe could tell, and whether the kernel has it
/// (`lb_kernel_feature{name}`).
pub fn probed() -> Vec<(&'static str, bool)> {
    lock(&PROBED)
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|has| (*n, *has)))
        .collect()
}

/// Whether the kernel has the feature named `name` of [`needed`] (probed once); `true`
/// when the probe cannot tell (the load or attach then says what failed).
pub fn has(name: &str) -> bool {
    FEATURES
        .iter()
        .find(|f| f.name == name)
        .is_none_or(|f| probe(*f) != Ok(false))
}

/// The features with `need` that the kernel lacks (each probed once).
pub fn missing(need: Need) -> Vec<Feature> {
    FEATURES
        .iter()
        .filter(|f| f.need == need && probe(**f) == Ok(false))
        .copied()
        .collect()
}

/// `what (kernel since)` for each feature, comma-separated.
pub fn describe(features: &[Feature]) -> String {
    let named: Vec<String> = features
        .iter()
        .map(|f| format!("{} (kernel {})", f.what, f.since))
        .collect();
    named.join(", ")
}

/// The kernels every feature was measured to work on (the README's kernel table).
pub const MEASURED: &str = "Linux 6.1 (Debian 12's 6.1.192) and 6.18";

/// Probes `features` with `has`: refuses the start (one error naming each missing
/// feature and the kernel that brought it) when the socket level cannot work; logs once
/// what the agent does without each other missing feature. A probe that cannot tell
/// counts as present (the load would then name what failed).
pub fn check_kernel(
    features: &[Feature],
    has: impl Fn(Feature) -> Result<bool, String>,
) -> Result<(), String> {
    let (mut start, mut packet, mut xdp) = (Vec::new(), Vec::new(), Vec::new());
    for f in features {
        match has(*f) {
            Ok(true) => {}
            Ok(false) => match f.need {
                Need::Start => start.push(*f),
                Need::PacketLevel => packet.push(*f),
                Need::Xdp => xdp.push(*f),
                Need::Fallback(instead) => tracing::warn!(
                    feature = f.name,
                    "this kernel has no {} (kernel {}): {instead}",
                    f.what,
                    f.since
                ),
            },
            Err(e) => tracing::warn!(
                feature = f.name,
                "cannot probe for {}: {e}; assumed present",
                f.what
            ),
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !packet.is_empty() {
        tracing::warn!(
            "this kernel ({}) lacks {}: the packet level (tc programs) stays off and --interface is refused; the socket level works",
            release.trim(),
            describe(&packet)
        );
    }
    if !xdp.is_empty() {
        tracing::warn!(
            "this kernel ({}) lacks {}: --acceleration native|generic stays off (XDP), tc handles the packet level",
            release.trim(),
            describe(&xdp)
        );
    }
    if start.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this kernel ({}) lacks {}: the socket-level programs cannot load (every feature the agent uses was measured to work on {MEASURED})",
        release.trim(),
        describe(&start)
    ))
}

/// The probes aya does not offer, each a bpf(2) call with a trivial program.
mod raw {
    use std::{
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// `mov r0, 1; exit`, as two instructions (opcode, registers, offset, immediate).
    const TRIVIAL: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

    /// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// `union bpf_attr` for BPF_LINK_CREATE, with room for the per-type fields (zero).
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 4],
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live value whose size is passed; the kernel reads and
        // writes only within it.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Loads the trivial program as `prog_type` for `attach_type`.
    fn load(prog_type: u32, attach_type: u32) -> io::Result<OwnedFd> {
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: TRIVIAL.len() as u32,
            insns: TRIVIAL.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            expected_attach_type: attach_type,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// EINVAL (or E2BIG: fields this kernel does not know) means "not here".
    fn absent(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG))
    }

    fn unknown(what: &str, e: io::Error) -> String {
        format!("{what}: {e}")
    }

    /// Whether a program of `prog_type` loads for `attach_type` (a kernel that does not
    /// know the attach type refuses it with EINVAL).
    pub fn attach_type(prog_type: u32, attach_type: u32) -> Result<bool, String> {
        match load(prog_type, attach_type) {
            Ok(_) => Ok(true),
            Err(e) if absent(&e) => Ok(false),
            Err(e) => Err(unknown("BPF_PROG_LOAD", e)),
        }
    }

    /// Links the trivial program of `prog_type` / `attach_type` to `target` as
    /// `link_type`: `Ok(true)` when the kernel got as far as looking the target up
    /// (`found_target_err`), `Ok(false)` when it refused the attach type (EINVAL).
    fn link(
        prog: (u32, u32),
        link_type: u32,
        target: u32,
        found_target_err: i32,
    ) -> Result<bool, String> {
        let fd = match load(prog.0, prog.1) {
            Ok(fd) => fd,
            Err(e) if absent(&e) => return Ok(false),
            Err(e) => return Err(unknown("BPF_PROG_LOAD", e)),
        };
        let mut attr = LinkCreate {
            prog_fd: fd.as_raw_fd() as u32,
            target,
            attach_type: link_type,
            ..Default::default()
        };
        match bpf(BPF_LINK_CREATE, &mut attr) {
            // Not expected with these targets; close it at once.
            // SAFETY: a new descriptor that nothing else owns.
            Ok(link) => drop(unsafe { OwnedFd::from_raw_fd(link as i32) }),
            Err(e) if e.raw_os_error() == Some(found_target_err) => {}
            Err(e) if absent(&e) => return Ok(false),
            Err(e) => return Err(unknown("BPF_LINK_CREATE", e)),
        }
        Ok(true)
    }

    /// Cgroup bpf_links (5.7): linking a connect4 program to no cgroup (fd -1) fails with
    /// EBADF where they exist, EINVAL where they do not.
    pub fn cgroup_link() -> Result<bool, String> {
        use aya_obj::generated::{bpf_attach_type as at, bpf_prog_type as pt};
        let connect4 = at::BPF_CGROUP_INET4_CONNECT as u32;
        let prog = (pt::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32, connect4);
        link(prog, connect4, u32::MAX, libc::EBADF)
    }

    /// TCX (6.6): linking a sched_cls program to interface 0 fails with ENODEV where it
    /// exists, EINVAL where it does not.
    pub fn tcx() -> Result<bool, String> {
        use aya_obj::generated::{bpf_attach_type as at, bpf_prog_type as pt};
        let prog = (pt::BPF_PROG_TYPE_SCHED_CLS as u32, 0);
        link(prog, at::BPF_TCX_INGRESS as u32, 0, libc::ENODEV)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_name_what_is_missing() {
        assert!(check_capabilities(u64::MAX).is_ok());
        let bpf = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(check_capabilities(bpf | (1 << CAP_NET_ADMIN)).is_ok());
        assert!(check_capabilities((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_ok());
        let err = check_capabilities(0).unwrap_err();
        assert!(
            err.contains(
                "CAP_BPF (or CAP_SYS_ADMIN), CAP_PERFMON (or CAP_SYS_ADMIN), CAP_NET_ADMIN"
            ),
            "{err}"
        );
        let err = check_capabilities(bpf).unwrap_err();
        assert!(err.contains("lacks CAP_NET_ADMIN ("), "{err}");
        let err = check_capabilities((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)).unwrap_err();
        assert!(
            err.contains("lacks CAP_PERFMON (or CAP_SYS_ADMIN) ("),
            "{err}"
        );
    }

    #[test]
    fn the_socket_closer_says_what_it_lacks() {
        assert!(socket_closer_missing(u64::MAX).is_empty());
        let daemonset_before = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        let missing = socket_closer_missing(daemonset_before).join(", ");
        assert!(
            missing.contains("CAP_SYS_PTRACE") && missing.contains("CAP_SYS_ADMIN"),
            "{missing}"
        );
    }

    /// A probe that says the kernel lacks the features named `lacks`.
    fn lacking(lacks: &'static [&'static str]) -> impl Fn(Feature) -> Result<bool, String> {
        move |f| Ok(!lacks.contains(&f.name))
    }

    #[test]
    fn a_kernel_without_a_socket_level_feature_is_refused_by_name() {
        assert!(check_kernel(FEATURES, |_| Ok(true)).is_ok());
        // A probe that cannot tell does not block the start.
        assert!(check_kernel(FEATURES, |_| Err("EPERM".into())).is_ok());
        let err = check_kernel(
            FEATURES,
            lacking(&["helper_get_netns_cookie", "attach_sock_release"]),
        )
        .unwrap_err();
        assert!(
            err.contains("lacks the cgroup sock_release hook (kernel 5.9), bpf_get_netns_cookie in sock_addr programs"),
            "{err}"
        );
        assert!(
            err.contains("(kernel 5.8)") && err.contains(MEASURED),
            "{err}"
        );
        assert!(!err.contains("5.18"), "{err}");
    }

    #[test]
    fn a_kernel_without_set_retval_starts_with_the_object_built_without_it() {
        // 5.10-6.0: only bpf_set_retval is missing; the start goes on.
        assert!(check_kernel(FEATURES, lacking(&[SET_RETVAL])).is_ok());
        let f = FEATURES.iter().find(|f| f.name == SET_RETVAL).unwrap();
        let Need::Fallback(instead) = f.need else {
            panic!("{f:?}")
        };
        assert!(
            instead.contains("EPERM instead of ECONNREFUSED") && instead.contains("sendmsg()"),
            "{instead}"
        );
        assert_eq!(f.since, "6.1");
        use crate::datapath::loader::EbpfObject;
        assert_eq!(EbpfObject::for_kernel(true), EbpfObject::Full);
        assert_eq!(EbpfObject::for_kernel(false), EbpfObject::NoSetRetval);
    }

    #[test]
    fn an_assumed_missing_feature_is_missing_whatever_the_probe_says() {
        let f = *FEATURES.iter().find(|f| f.name == SET_RETVAL).unwrap();
        let probed = std::cell::Cell::new(false);
        let kernel = || {
            probed.set(true);
            Ok(true)
        };
        assert_eq!(answer(f, &[SET_RETVAL], kernel), Ok(false));
        assert!(!probed.get(), "an assumed feature is not probed");
        assert_eq!(answer(f, &[TCX], kernel), Ok(true));
        assert_eq!(answer(f, &[], || Err("EPERM".into())), Err("EPERM".into()));
        // The flag takes the metric's names, and lists them for a wrong one.
        assert_eq!(feature_name("helper_set_retval"), Ok(SET_RETVAL));
        let err = feature_name("set_retval").unwrap_err();
        assert!(
            err.contains("\"set_retval\" is not a kernel feature")
                && err.contains("helper_set_retval, "),
            "{err}"
        );
    }

    #[test]
    fn a_kernel_without_a_tc_feature_or_tcx_still_starts() {
        // The packet level stays off (attach_tc refuses --interface), the socket level runs.
        assert!(
            check_kernel(
                FEATURES,
                lacking(&["helper_redirect_neigh", "prog_sched_cls"])
            )
            .is_ok()
        );
        // Without XDP's helpers acceleration stays off; everything else runs.
        assert!(check_kernel(FEATURES, lacking(&["helper_xdp_load_bytes", "prog_xdp"])).is_ok());
        // Without TCX the tc programs go on clsact qdiscs.
        assert!(check_kernel(FEATURES, lacking(&[TCX])).is_ok());
        let tcx = FEATURES.iter().find(|f| f.name == TCX).unwrap();
        assert!(matches!(tcx.need, Need::Fallback(_)), "{tcx:?}");
        assert_eq!(describe(&[*tcx]), "TCX links for tc programs (kernel 6.6)");
    }

    #[test]
    fn feature_names_are_unique_metric_labels() {
        let mut names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
        assert!(
            names.iter().all(|n| n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')),
            "{names:?}"
        );
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a name used twice");
    }

    #[test]
    fn this_kernel_has_everything() {
        // Probing needs CAP_BPF: only as root.
        if check_capabilities(effective_capabilities()).is_err() {
            return;
        }
        let lacks: Vec<&str> = FEATURES
            .iter()
            .filter(|f| probe(**f) != Ok(true))
            .map(|f| f.name)
            .collect();
        assert!(lacks.is_empty(), "{lacks:?}");
        // Each answer is kept for /metrics.
        let probed = probed();
        assert!(probed.contains(&(TCX, true)), "{probed:?}");
        assert_eq!(probed.len(), FEATURES.len(), "{probed:?}");
        // The raw probes tell a missing attach type (EINVAL) from a present one.
        assert_eq!(raw::attach_type(SOCK_ADDR, 9_999), Ok(false));
    }
}
