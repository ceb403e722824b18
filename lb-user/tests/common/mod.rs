//! Shared by the integration tests: manifest builders, the lab fixture, the fake API.
#![allow(dead_code, reason = "each test crate uses a part of this module")]

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_lab::fake_api::FakeApi;
use lb_lab::lab::{AgentProcess, Lab, ProbeMode, ProbeOptions, ProbeReport};

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_lb-user");

/// The lab's own binary (pod servers, probes), built by the lb-lab package.
pub fn lab_bin() -> PathBuf {
    lb_lab::binary("lb-lab").expect("the lb-lab binary")
}
pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const POD_PORT: u16 = 8080;

/// How long an agent may take to load its programs and sync its first objects: 20 s, or
/// `LB_TEST_SYNC_TIMEOUT_S` when longer (`cargo xtask test --kernel` sets it: a kernel
/// under emulation verifies the programs and writes the maps slowly).
pub fn sync_timeout() -> Duration {
    let secs = std::env::var("LB_TEST_SYNC_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0u64);
    Duration::from_secs(secs.max(20))
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests need root: they create network namespaces and load BPF programs \
         (run `cargo xtask test` as root)"
    );
}

pub fn service(name: &str, ip: Ipv4Addr, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: {port}, targetPort: http}}\n"
    )
}

pub fn slice(service: &str, pods: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-a\n  \
         namespace: t\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {POD_PORT}, protocol: TCP}}]\nendpoints:\n"
    );
    if pods.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for ip in pods {
        s.push_str(&format!(
            "- addresses: [{ip}]\n  conditions: {{ready: true}}\n"
        ));
    }
    s
}

/// A lab, a manifest directory and a running agent attached to the lab's cgroup.
pub struct Fixture {
    pub agent: AgentProcess,
    pub lab: Lab,
    pub dir: PathBuf,
    /// The script that runs the agent with the DaemonSet's capabilities, if it does.
    wrapper: Option<PathBuf>,
}

impl Fixture {
    pub fn new(tag: &str, pods: usize, files: &[(&str, String)]) -> Self {
        Self::with_source(tag, pods, files, None, &[])
    }

    /// The agent as the DaemonSet of manifests/deploy runs it: with exactly the
    /// capabilities its container adds (read from the manifest) and in the host's PID
    /// namespace (as `hostPID` there must say), else as [`Fixture::with_source`].
    pub fn as_daemonset(
        tag: &str,
        pods: usize,
        files: &[(&str, String)],
        extra_args: &[&str],
    ) -> Self {
        require_root();
        let wrapper =
            std::env::temp_dir().join(format!("{}-agent.sh", lb_lab::lab::unique_prefix(tag)));
        let caps: Vec<String> = daemonset_capabilities()
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec setpriv --bounding-set=-all,{} --inh-caps=-all {AGENT_BIN} \"$@\"\n",
                caps.join(",")
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut fx = Self::start(tag, pods, files, None, extra_args, &wrapper);
        fx.wrapper = Some(wrapper);
        fx
    }

    /// With `api`, the agent watches that (fake) API server instead of the manifests.
    pub fn with_source(
        tag: &str,
        pods: usize,
        files: &[(&str, String)],
        api: Option<&FakeApi>,
        extra_args: &[&str],
    ) -> Self {
        Self::start(tag, pods, files, api, extra_args, Path::new(AGENT_BIN))
    }

    fn start(
        tag: &str,
        pods: usize,
        files: &[(&str, String)],
        api: Option<&FakeApi>,
        extra_args: &[&str],
        agent_bin: &Path,
    ) -> Self {
        require_root();
        let lab = Lab::new(&lab_bin(), tag, pods, POD_PORT).expect("creating the lab");
        let dir = std::env::temp_dir().join(&lab.prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        for (name, text) in files {
            write_atomic(&dir.join("manifests").join(name), text);
        }
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", lab.prefix));
        let manifests = dir.join("manifests");
        let kubeconfig = api.map(|a| a.kubeconfig(&dir));
        let mut source: Vec<&std::ffi::OsStr> = match &kubeconfig {
            Some(k) => vec![
                "--kubeconfig".as_ref(),
                k.as_os_str(),
                "--hostname-override".as_ref(),
                "node-a".as_ref(),
            ],
            None => vec!["--manifests".as_ref(), manifests.as_os_str()],
        };
        source.extend(extra_args.iter().map(std::ffi::OsStr::new));
        let mut agent = AgentProcess::start(
            agent_bin,
            &source,
            &lab.cgroup.path,
            &pin,
            &dir.join("agent.log"),
        )
        .expect("starting the agent");
        agent.wait_synced(1, sync_timeout()).expect("agent ready");
        Self {
            agent,
            lab,
            dir,
            wrapper: None,
        }
    }

    pub fn pod_ips(&self, which: &[usize]) -> Vec<Ipv4Addr> {
        which.iter().map(|i| self.lab.pods[*i].ip).collect()
    }

    pub fn write(&self, name: &str, text: &str) {
        write_atomic(&self.dir.join("manifests").join(name), text);
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join("manifests").join(name)).unwrap();
    }

    /// Waits (up to 5 s) until `target` answers one exchange in `mode`.
    pub fn wait_answering(&self, target: impl Into<SocketAddr>, mode: ProbeMode) {
        let target = target.into();
        let ok = lb_lab::lab::wait_for(Duration::from_secs(5), || {
            let r = self
                .lab
                .probe(&ProbeOptions::tcp(target, 1).with_mode(mode), true)
                .ok()?;
            (r.total_replies() == 1).then_some(())
        });
        assert!(
            ok.is_some(),
            "{target} never answered:\n{}",
            self.agent.log()
        );
    }

    pub fn probe(&self, ip: Ipv4Addr, count: usize) -> ProbeReport {
        self.lab
            .probe(&ProbeOptions::tcp(SocketAddrV4::new(ip, 80), count), true)
            .unwrap_or_else(|e| panic!("probe failed: {e:#}\nagent log:\n{}", self.agent.log()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.agent.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(w) = &self.wrapper {
            let _ = std::fs::remove_file(w);
        }
    }
}

/// Writes through a hidden temporary file and a rename, as editors and kubectl do, so
/// the agent never reads half a file.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://127.0.0.1:PORT/PATH, the body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the agent");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

/// The capabilities the DaemonSet of manifests/deploy adds to the agent's container
/// (`BPF`, `NET_ADMIN`, ...); asserts that it runs in the host's PID namespace, as the
/// tests' agents do.
pub fn daemonset_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ds: serde_yaml::Value = serde_yaml::from_str(text.split("\n---").next().unwrap()).unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(
        spec["hostPID"].as_bool(),
        Some(true),
        "{}: hostPID",
        path.display()
    );
    let agent = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["args"][0].as_str() == Some("run"))
        .expect("the agent's container runs `lb-user run`");
    agent["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// The XDP mode the packet-level tests run in: `LB_TEST_ACCELERATION` (native,
/// generic), else none (tc only); `cargo xtask test` runs them in each.
pub fn acceleration() -> Option<String> {
    std::env::var("LB_TEST_ACCELERATION")
        .ok()
        .filter(|a| !a.is_empty() && a != "off")
}

/// The two-node cluster lab (`pods` pods a node) for the packet-level tests; with an
/// XDP mode, its LAN ports take the frames the nodes' XDP programs send back.
pub fn packet_cluster(
    tag: &str,
    pods: usize,
    acceleration: Option<&str>,
) -> lb_lab::cluster::Cluster {
    require_root();
    let mut cluster =
        lb_lab::cluster::Cluster::new(&lab_bin(), tag, 2, pods, POD_PORT).expect("the cluster lab");
    if acceleration.is_some() {
        cluster
            .accept_xdp()
            .expect("the LAN ports accept XDP frames");
    }
    cluster
}
