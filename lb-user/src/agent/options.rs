//! `lb-user run`'s flags, defined once (clap derive), and what they resolve to.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    datapath::loader,
    source::{self, SourceSpec},
};

/// The flags of `lb-user run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Read Service, EndpointSlice and Node objects from this YAML/JSON file or
    /// directory instead of the Kubernetes API.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig file (default: in-cluster service account, then KUBECONFIG, then
    /// ~/.kube/config).
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (default: the NODE_NAME environment variable, then the hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// An address of this node on which nodePorts are served (repeatable; default:
    /// the Node object's InternalIP and ExternalIP addresses). 127.0.0.1 always is.
    #[arg(long = "node-ip", value_name = "ADDR")]
    pub node_ips: Vec<std::net::IpAddr>,
    /// An external interface of the node for the packet level (tc programs: NodePort,
    /// externalIPs and LoadBalancer IPs for clients outside the node); repeatable.
    /// Default: the interfaces that carry a node address (--node-ip, else the Node
    /// object's, followed as they change).
    #[arg(long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// XDP acceleration of the packet level (Cilium's `loadBalancer.acceleration`):
    /// `native` runs an XDP program in each external interface's driver (generic XDP
    /// where the driver has none), `generic` in the stack's generic XDP hook, `off` tc
    /// only. XDP translates inbound NodePort / externalIP / LoadBalancer-IP packets and
    /// drops what is refused before the stack sees them; tc keeps the rest. Off by
    /// default, as in Cilium: XDP_TX and redirects into a veth are delivered only when
    /// the peer accepts XDP frames (an XDP program or GRO on it; see the README).
    #[arg(long, value_enum, default_value_t)]
    pub acceleration: crate::datapath::loader::Acceleration,
    /// How the packet level chooses a new flow's backend for traffic from outside the
    /// node (Cilium's `--bpf-lb-algorithm`, `loadBalancer.algorithm`): `random`, or
    /// `maglev`, Maglev consistent hashing of the flow's 5-tuple over a lookup table per
    /// external frontend (nodePort, externalIP, LoadBalancer IP), so that every node
    /// behind one load balancer sends a flow to the same backend and a flow whose
    /// connection-tracking entry is lost comes back to its backend. ClientIP affinity
    /// keeps precedence; the socket level (cluster IPs) always chooses at random.
    #[arg(long, value_enum, default_value_t)]
    pub lb_algorithm: LbAlgorithm,
    /// Entries of each Maglev table (a prime; Cilium's `--bpf-lb-maglev-table-size`):
    /// 4 bytes each per external frontend, 64 KiB at the default. More entries spread
    /// the flows more evenly over many backends (Maglev wants at least 100 per backend).
    #[arg(long, default_value_t = lb_core::maglev::DEFAULT_TABLE_SIZE,
          value_parser = parse_table_size)]
    pub maglev_table_size: u32,
    /// The maps' capacities (a map already pinned keeps the size it was made with).
    #[command(flatten)]
    pub map_sizes: crate::datapath::loader::MapSizes,
    /// cgroup v2 directory whose processes get service translation (and every one
    /// below it). Default: the root of the cgroup v2 hierarchy, the whole node.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Directory (on a bpf filesystem) where the maps are pinned.
    #[arg(long, default_value = crate::datapath::loader::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Shortest time between two syncs: a burst of changes becomes one sync
    /// (a duration as Go writes them: 1s, 250ms, 1m30s, 0).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,
    /// How often the maps are read back and whatever changed behind the agent's back
    /// is repaired (kube-proxy's --sync-period); 0 to never.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// How long one pass of the stale-socket closer may spend entering network
    /// namespaces; the namespaces left wait for the next pass, which starts after a pause
    /// as long (so the closer uses at most about half a CPU while a pass is long).
    #[arg(long, default_value = "1s", value_parser = parse_timeout)]
    pub socket_closer_budget: Duration,
    /// Where to serve /metrics; empty to disable.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: Bind,
    /// Where to serve /healthz and /livez (kube-proxy's semantics); empty to disable.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: Bind,
    /// How long a change may wait for its sync before /healthz answers 503
    /// (kube-proxy: twice its sync period).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub healthz_timeout: Duration,
    /// How long the Kubernetes API may take to answer each LIST page and to start
    /// each WATCH before the request is abandoned and retried with backoff (also the
    /// connect timeout, at most 30s). Watches themselves last 5-10 minutes.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub api_timeout: Duration,
    /// How often to look for changed manifests, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// Forward the programs' own debug messages (aya-log) to this log.
    #[arg(long)]
    pub bpf_debug: bool,
    /// Turn on the kernel's BPF statistics while the agent runs (BPF_ENABLE_STATS: each
    /// program's run time and run count, in /metrics as lb_program_run_seconds and
    /// lb_program_runs; costs some nanoseconds a run). Needs CAP_SYS_ADMIN.
    #[arg(long)]
    pub bpf_stats: bool,
    /// At exit, detach the programs and remove the pins (as `lb-user cleanup` does).
    /// Without it, a stopped agent leaves the datapath serving, as kube-proxy's rules
    /// outlive kube-proxy, and the next agent adopts it.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// For tests and diagnosis: take the kernel feature NAME (a `name` of the
    /// lb_kernel_feature metric) as missing whatever the kernel has, so the agent runs
    /// as on a kernel without it (repeatable). `helper_set_retval` loads the programs
    /// built without bpf_set_retval (as below Linux 6.1: a refused connect() gets EPERM).
    #[arg(long = "assume-missing-kernel-feature", value_name = "NAME",
          value_parser = crate::datapath::checks::feature_name)]
    pub assume_missing_kernel_features: Vec<&'static str>,
}

impl RunOptions {
    /// Where the objects come from: --manifests, else the Kubernetes API.
    pub fn source(&self) -> SourceSpec {
        match &self.manifests {
            Some(path) => SourceSpec::Manifests(path.clone()),
            None => SourceSpec::Kube {
                kubeconfig: self.kubeconfig.clone(),
            },
        }
    }

    /// --cgroup, else the root of the cgroup v2 hierarchy.
    pub fn cgroup(&self) -> PathBuf {
        self.cgroup.clone().unwrap_or_else(|| {
            loader::mount_point("cgroup2").unwrap_or_else(|| "/sys/fs/cgroup".into())
        })
    }

    /// This node's name (internalTrafficPolicy Local, topology, the Node watch):
    /// --hostname-override, else NODE_NAME, else the hostname.
    pub fn node_name(&self) -> String {
        source::node_name(self.hostname_override.as_deref())
    }

    /// How often the manifest path is checked for changes.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(1))
    }

    /// The Maglev tables' size in maglev mode; `None` in random mode.
    pub fn maglev(&self) -> Option<u32> {
        (self.lb_algorithm == LbAlgorithm::Maglev).then_some(self.maglev_table_size)
    }

    /// aya-log level for the programs' own messages (0 = off, 4 = debug).
    pub fn bpf_log_level(&self) -> u8 {
        if self.bpf_debug { 4 } else { 0 }
    }
}

/// `--lb-algorithm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// A backend at random for each new flow (Cilium's default).
    #[default]
    Random,
    /// Maglev consistent hashing for external frontends.
    Maglev,
}

/// `--maglev-table-size`: a number and one of the primes lb_core::maglev accepts.
pub fn parse_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .trim()
        .parse()
        .map_err(|e| format!("--maglev-table-size {text:?}: {e}"))?;
    lb_core::maglev::check_table_size(size).map_err(|e| format!("--maglev-table-size: {e}"))
}

/// A listen address flag: IP:PORT, or empty for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind(pub Option<SocketAddr>);

impl std::str::FromStr for Bind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self(None));
        }
        text.parse()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{text:?}: {e} (want IP:PORT, or empty for none)"))
    }
}

/// Durations as kube-proxy's flags take them (Go's time.ParseDuration): a sequence of
/// decimal numbers, each with a unit (ns, us, µs, ms, s, m, h): "1s", "250ms", "1.5s",
/// "1m30s"; "0" alone needs none.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty: give a duration such as 30s or 1m30s".into());
    }
    let mut secs = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: add a unit (ms, s, m, h)"))?;
        let (number, tail) = rest.split_at(digits);
        let n: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        secs += n * match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        rest = tail;
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// A Go-style duration that is not zero (a timeout).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kube_proxy_flags() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Ok(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert!(parse_duration("1m30").unwrap_err().contains("add a unit"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("10").unwrap_err().contains("add a unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_timeout("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_timeout("0").unwrap_err().contains("longer than 0"));
    }

    #[test]
    fn a_listen_address_may_be_empty_for_none() {
        assert_eq!("".parse::<Bind>(), Ok(Bind(None)));
        assert!("127.0.0.1:10249".parse::<Bind>().unwrap().0.is_some());
        let err = "localhost".parse::<Bind>().unwrap_err();
        assert!(err.contains("want IP:PORT"), "{err}");
    }

    #[test]
    fn every_flag_is_defined_once_with_its_default() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunOptions,
        }
        let opts = <Cli as clap::Parser>::parse_from(["lb-user"]).run;
        assert_eq!(
            opts.metrics_bind_address,
            Bind(Some("127.0.0.1:10249".parse().unwrap()))
        );
        assert_eq!(opts.sync_period, Duration::from_secs(30));
        assert!(matches!(
            opts.source(),
            SourceSpec::Kube { kubeconfig: None }
        ));
        let opts = <Cli as clap::Parser>::try_parse_from([
            "lb-user",
            "--manifests",
            "/m",
            "--metrics-bind-address",
            "",
            "--bpf-debug",
        ])
        .unwrap()
        .run;
        assert!(
            matches!(opts.source(), SourceSpec::Manifests(p) if p == std::path::Path::new("/m"))
        );
        assert_eq!(
            (opts.metrics_bind_address, opts.bpf_log_level()),
            (Bind(None), 4)
        );
        let err = <Cli as clap::Parser>::try_parse_from(["lb-user", "--healthz-bind-address", "x"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--healthz-bind-address") && err.contains("want IP:PORT"),
            "{err}"
        );
    }

    #[test]
    fn the_lb_algorithm_is_random_by_default_and_maglev_takes_a_prime_table_size() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunOptions,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(["lb-user"].iter().chain(args))
                .map(|c| c.run)
                .map_err(|e| e.to_string())
        };
        let opts = parse(&[]).unwrap();
        assert_eq!(opts.lb_algorithm, LbAlgorithm::Random);
        assert_eq!(opts.maglev(), None);
        let opts = parse(&["--lb-algorithm", "maglev"]).unwrap();
        assert_eq!(opts.maglev(), Some(16381));
        let opts = parse(&["--lb-algorithm=maglev", "--maglev-table-size", "251"]).unwrap();
        assert_eq!(opts.maglev(), Some(251));
        for bad in ["16384", "x", "0"] {
            let err = parse(&["--lb-algorithm=maglev", "--maglev-table-size", bad]).unwrap_err();
            assert!(err.contains("--maglev-table-size"), "{bad}: {err}");
        }
        let err = parse(&["--maglev-table-size", "16384"]).unwrap_err();
        assert!(err.contains("16381"), "{err}");
        let err = parse(&["--lb-algorithm", "roundrobin"]).unwrap_err();
        assert!(
            err.contains("--lb-algorithm") && err.contains("maglev"),
            "{err}"
        );
    }
}
