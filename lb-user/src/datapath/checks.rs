//! Startup checks: what the agent needs of its process and of the kernel, each failing
//! with an error that names what is missing and how to get it, before anything loads.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

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

/// One kernel feature the programs use.
#[derive(Clone, Copy, Debug)]
pub enum Feature {
    Program(ProgramType, &'static str),
    Map(MapType, &'static str),
    Helper(ProgramType, BpfHelper, &'static str),
}

/// Everything the programs need of the kernel, named as an error would.
pub fn needed() -> Vec<Feature> {
    use Feature::{Helper, Map, Program};
    let (sock, tc) = (ProgramType::CgroupSockAddr, ProgramType::SchedClassifier);
    vec![
        Program(sock, "cgroup/sock_addr programs (kernel 4.17)"),
        Program(tc, "tc (sched_cls) programs"),
        Map(MapType::LruHash, "LRU hash maps (kernel 4.10)"),
        Map(MapType::LpmTrie, "LPM trie maps (kernel 4.11)"),
        Map(MapType::PerCpuArray, "per-CPU array maps"),
        Helper(
            sock,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie in sock_addr programs (kernel 5.8)",
        ),
        Helper(
            sock,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in sock_addr programs (kernel 5.8)",
        ),
        Helper(
            sock,
            BpfHelper::BPF_FUNC_set_retval,
            "bpf_set_retval in sock_addr programs (kernel 5.18)",
        ),
        Helper(
            sock,
            BpfHelper::BPF_FUNC_get_prandom_u32,
            "bpf_get_prandom_u32 in sock_addr programs",
        ),
        Helper(
            sock,
            BpfHelper::BPF_FUNC_ktime_get_ns,
            "bpf_ktime_get_ns in sock_addr programs",
        ),
        Helper(
            tc,
            BpfHelper::BPF_FUNC_fib_lookup,
            "bpf_fib_lookup in tc programs (kernel 4.18)",
        ),
        Helper(
            tc,
            BpfHelper::BPF_FUNC_redirect_neigh,
            "bpf_redirect_neigh in tc programs (kernel 5.10)",
        ),
        Helper(
            tc,
            BpfHelper::BPF_FUNC_l4_csum_replace,
            "bpf_l4_csum_replace in tc programs",
        ),
        Helper(
            tc,
            BpfHelper::BPF_FUNC_skb_store_bytes,
            "bpf_skb_store_bytes in tc programs",
        ),
    ]
}

/// Whether the running kernel has `f` (an error when it cannot tell).
pub fn probe(f: Feature) -> Result<bool, String> {
    match f {
        Feature::Program(t, _) => is_program_supported(t).map_err(|e| e.to_string()),
        Feature::Map(t, _) => is_map_supported(t).map_err(|e| e.to_string()),
        Feature::Helper(t, h, _) => is_helper_supported(t, h).map_err(|e| e.to_string()),
    }
}

fn name(f: &Feature) -> &'static str {
    match f {
        Feature::Program(_, n) | Feature::Map(_, n) | Feature::Helper(_, _, n) => n,
    }
}

/// Every feature of `features` that `has` says the kernel lacks, in one error. A probe
/// that cannot tell is not counted as missing (the load would then name it).
pub fn check_kernel(
    features: &[Feature],
    has: impl Fn(Feature) -> Result<bool, String>,
) -> Result<(), String> {
    let missing: Vec<&str> = features
        .iter()
        .filter(|f| has(**f) == Ok(false))
        .map(name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Err(format!(
        "this kernel ({}) lacks {}: the programs cannot load (kernel 6.6 or newer is tested)",
        release.trim(),
        missing.join(", ")
    ))
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

    #[test]
    fn a_kernel_without_a_helper_is_refused_by_name() {
        let features = needed();
        assert!(check_kernel(&features, |_| Ok(true)).is_ok());
        // A probe that cannot tell does not block the start.
        assert!(check_kernel(&features, |_| Err("EPERM".into())).is_ok());
        let err = check_kernel(&features, |f| {
            Ok(!matches!(f, Feature::Helper(_, h, _) if h == BpfHelper::BPF_FUNC_redirect_neigh))
        })
        .unwrap_err();
        assert!(
            err.contains("lacks bpf_redirect_neigh in tc programs (kernel 5.10)"),
            "{err}"
        );
    }

    #[test]
    fn this_kernel_has_everything() {
        // Probing needs CAP_BPF: only as root.
        if check_capabilities(effective_capabilities()).is_ok() {
            assert_eq!(check_kernel(&needed(), probe), Ok(()));
        }
    }
}
