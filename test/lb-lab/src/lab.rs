//! A lab on one machine: network namespaces as a node and its pods, servers in the pods,
//! and clients placed in a cgroup and the node's namespace. Used by the integration tests,
//! `lb-lab demo` and the benchmarks. Everything it creates is removed when its guard is
//! dropped, on failure too; it only ever kills processes it started, by PID.
//!
//! Layout for a lab with `n` pods:
//!
//! ```text
//!  netns <prefix>-node                       netns <prefix>-p<i>
//!   veth<i> 10.244.<i+1>.1/24         <---->  eth0 10.244.<i+1>.2/24, default via .1
//!           fd00:10:244:<i+1>::1/64                fd00:10:244:<i+1>::2/64, default via ::1
//! ```
//!
//! The node namespace has routes to its pods only: a connection to a service address
//! that is not rewritten fails there (ENETUNREACH) and never leaves the machine. It
//! forwards between its pods, so a pod can be a client too.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::ValueEnum as _;
use serde::{Deserialize, Serialize};

use lb_user::datapath::loader::mount_point;

/// Runs a command to completion; the error names the command and carries its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` to completion with `input` on its standard input; the error names the
/// command and carries its stderr.
pub fn run_with_input(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A veth pair: `name` in namespace `ns`, `peer` in namespace `peer_ns`.
pub fn veth_pair(ns: &str, name: &str, peer_ns: &str, peer: &str) -> anyhow::Result<()> {
    ip(&[
        "-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])
}

/// A unique prefix for one lab: tag, PID and a counter.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "lb{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // No duplicate address detection on the interfaces to come: a link-local
        // address still being checked holds up neighbour discovery (the first IPv6
        // packets would wait a second or two).
        ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`: the `ip` command inside the namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend(args);
        ip(&full)
    }

    /// `sysctl -w SETTING` inside the namespace (per-namespace settings only).
    pub fn sysctl(&self, setting: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args(["netns", "exec", &self.name, "sysctl", "-qw", setting]))
            .map(drop)
    }

    pub fn file(&self) -> anyhow::Result<File> {
        let path = format!("/var/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("lab cleanup: {e}");
        }
    }
}

/// A cgroup v2 directory, removed on drop (once the processes in it have exited).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let root = mount_point("cgroup2").context("no cgroup v2 filesystem is mounted")?;
        let path = root.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Exited processes leave the cgroup asynchronously: retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lab cleanup: cannot remove cgroup {}", self.path.display());
    }
}

/// A child process that is killed (by its PID) and reaped on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// SIGTERM, then up to `grace` for it to exit, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.0.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        self.0.wait().ok();
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Prepares `cmd` to start inside `netns` and, if given, `cgroup` (joined first: the
/// cgroup file is opened here, written from the child before exec).
pub fn place(cmd: &mut Command, netns: &Netns, cgroup: Option<&Cgroup>) -> anyhow::Result<()> {
    place_file(cmd, netns.file()?, cgroup)
}

/// [`place`] with the namespace as an open file.
fn place_file(cmd: &mut Command, ns: File, cgroup: Option<&Cgroup>) -> anyhow::Result<()> {
    let procs = match cgroup {
        Some(cg) => {
            let p = cg.path.join("cgroup.procs");
            Some(
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))?,
            )
        }
        None => None,
    };
    // SAFETY: the closure only makes async-signal-safe system calls (write, setns) on
    // file descriptors opened before fork, which it owns through the moved Files.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(f) = &procs {
                // "0" moves the writing process itself.
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs every thread of process `pid` on CPU `cpu` only, or on every CPU (`None`).
pub fn set_affinity(pid: u32, cpu: Option<usize>) -> anyhow::Result<()> {
    // SAFETY: a cpu_set_t is plain data; CPU_ZERO / CPU_SET write within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for c in (0..cpus.max(64)).filter(|c| cpu.is_none_or(|only| only == *c)) {
        // SAFETY: as above; c is below CPU_SETSIZE (1024).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of process {pid}"))?;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: sched_setaffinity(2) with a live cpu_set_t of the size passed.
        let rc =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("setting the CPUs of thread {tid}"));
            }
        }
    }
    Ok(())
}

/// A pod: its namespace, address and server.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    server: Option<ChildGuard>,
    /// Other processes started in the pod (`Lab::spawn_in_pod`).
    extra: Vec<ChildGuard>,
    pub netns: Netns,
}

/// The node, its pods and a client cgroup.
pub struct Lab {
    pub prefix: String,
    pub pods: Vec<Pod>,
    pub cgroup: Cgroup,
    pub node: Netns,
    pub lab_bin: PathBuf,
    pub server_port: u16,
    /// Extra arguments of every pod's `lb-lab serve`.
    server_args: Vec<String>,
    /// Pod `i` is `<pod_prefix>pod-<i>` on 10.244.<first_subnet + i>.2.
    pod_prefix: String,
    first_subnet: usize,
}

/// How a lab's node and pods are made; [`Lab::build`] makes them.
#[derive(Clone, Debug)]
pub struct LabSpec<'a> {
    pub tag: &'a str,
    pub pods: usize,
    pub server_port: u16,
    pub server_args: &'a [&'a str],
    /// Names pods `<pod_prefix>pod-<i>`.
    pub pod_prefix: &'a str,
    /// Pod `i` gets 10.244.<first_subnet + i>.0/24.
    pub first_subnet: usize,
}

impl<'a> LabSpec<'a> {
    pub fn new(tag: &'a str, pods: usize, server_port: u16) -> Self {
        Self {
            tag,
            pods,
            server_port,
            server_args: &[],
            pod_prefix: "",
            first_subnet: 1,
        }
    }
}

impl Lab {
    /// Creates the node, `pods` pods each running `lab_bin serve` on `server_port`
    /// (TCP and UDP), and an empty client cgroup.
    pub fn new(lab_bin: &Path, tag: &str, pods: usize, server_port: u16) -> anyhow::Result<Self> {
        Self::new_with(lab_bin, tag, pods, server_port, &[])
    }

    /// [`Lab::new`] with extra arguments for the pods' servers (`--bench`).
    pub fn new_with(
        lab_bin: &Path,
        tag: &str,
        pods: usize,
        server_port: u16,
        server_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::build(
            lab_bin,
            &LabSpec {
                server_args,
                ..LabSpec::new(tag, pods, server_port)
            },
        )
    }

    /// A lab as `spec` says.
    pub fn build(lab_bin: &Path, spec: &LabSpec<'_>) -> anyhow::Result<Self> {
        let LabSpec {
            tag,
            pods,
            server_port,
            server_args,
            pod_prefix,
            first_subnet,
        } = *spec;
        if first_subnet + pods > 251 || first_subnet == 0 {
            bail!("a lab's pod subnets are 10.244.1.0/24 to 10.244.250.0/24");
        }
        let prefix = unique_prefix(tag);
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward=1")?;
        node.sysctl("net.ipv6.conf.all.forwarding=1")?;
        let cgroup = Cgroup::create(&prefix)?;
        let mut lab = Self {
            prefix,
            pods: Vec::new(),
            cgroup,
            node,
            lab_bin: lab_bin.to_path_buf(),
            server_port,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            pod_prefix: pod_prefix.to_string(),
            first_subnet,
        };
        for i in 0..pods {
            lab.add_pod(i)?;
        }
        Ok(lab)
    }

    fn add_pod(&mut self, i: usize) -> anyhow::Result<()> {
        let netns = Netns::create(&format!("{}-p{i}", self.prefix))?;
        let (node, pod) = (self.node.name.as_str(), netns.name.as_str());
        let subnet = self.first_subnet + i;
        let veth = format!("veth{i}");
        veth_pair(node, &veth, pod, "eth0")?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("10.244.{subnet}.1/24"),
            "dev",
            &veth,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "up"])?;
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("10.244.{subnet}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            &format!("10.244.{subnet}.1"),
        ])?;
        // IPv6 beside it; nodad: the addresses are usable at once.
        let (node6, pod6) = (
            format!("fd00:10:244:{subnet:x}::1/64"),
            format!("fd00:10:244:{subnet:x}::2/64"),
        );
        ip(&["-n", node, "addr", "add", &node6, "dev", &veth, "nodad"])?;
        ip(&["-n", pod, "addr", "add", &pod6, "dev", "eth0", "nodad"])?;
        ip(&[
            "-n",
            pod,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:10:244:{subnet:x}::1"),
        ])?;
        let name = format!("{}pod-{i}", self.pod_prefix);
        let child = self.spawn_server(&netns, &name)?;
        self.pods.push(Pod {
            name,
            ip: Ipv4Addr::new(10, 244, subnet as u8, 2),
            ip6: Ipv6Addr::new(0xfd00, 0x10, 0x244, subnet as u16, 0, 0, 0, 2),
            server: Some(child),
            extra: Vec::new(),
            netns,
        });
        Ok(())
    }

    /// `lab_bin serve` as pod `name` in `netns`, once it says it is ready.
    fn spawn_server(&self, netns: &Netns, name: &str) -> anyhow::Result<ChildGuard> {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.args([
            "serve",
            "--name",
            name,
            "--port",
            &self.server_port.to_string(),
        ])
        .args(&self.server_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null());
        place(&mut cmd, netns, None)?;
        let mut child = ChildGuard(cmd.spawn().with_context(|| format!("starting {cmd:?}"))?);
        let mut line = String::new();
        let stdout = child.0.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!(
                "server {name} in {} did not start (printed {line:?})",
                netns.name
            );
        }
        Ok(child)
    }

    /// Runs the pods' servers on CPU `cpu` only, or on every CPU again (`None`).
    pub fn pin_servers(&self, cpu: Option<usize>) -> anyhow::Result<()> {
        for pod in &self.pods {
            for child in pod.server.iter().chain(&pod.extra) {
                set_affinity(child.0.id(), cpu)?;
            }
        }
        Ok(())
    }

    /// Runs `lab_bin probe` from the node namespace, inside the client cgroup or not.
    pub fn probe(&self, opts: &ProbeOptions, in_cgroup: bool) -> anyhow::Result<ProbeReport> {
        self.probe_from(opts, &self.node, in_cgroup)
    }

    /// Runs `lab_bin probe` from `netns` (the node's or a pod's), in the client cgroup or not.
    pub fn probe_from(
        &self,
        opts: &ProbeOptions,
        netns: &Netns,
        in_cgroup: bool,
    ) -> anyhow::Result<ProbeReport> {
        let mut cmd = self.probe_command(opts, netns, in_cgroup)?;
        let out = run(&mut cmd)?;
        serde_json::from_str(out.trim()).with_context(|| format!("probe printed {out:?}"))
    }

    fn probe_command(
        &self,
        opts: &ProbeOptions,
        netns: &Netns,
        in_cgroup: bool,
    ) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.arg("probe")
            .args(["--target", &opts.target.to_string()])
            .args(["--count", &opts.count.to_string()])
            .args(["--timeout-ms", &opts.timeout.as_millis().to_string()])
            .args(["--interval-ms", &opts.interval.as_millis().to_string()])
            .args(["--source-port", &opts.source_port.to_string()])
            .args(["--size", &opts.size.to_string()]);
        cmd.args([
            "--mode",
            opts.mode
                .to_possible_value()
                .expect("no skipped variants")
                .get_name(),
        ]);
        place(&mut cmd, netns, in_cgroup.then_some(&self.cgroup))?;
        Ok(cmd)
    }

    /// [`Lab::probe`] started in the background (from the node, in the client cgroup);
    /// [`RunningProbe::finish`] waits for its report.
    pub fn start_probe(&self, opts: &ProbeOptions) -> anyhow::Result<RunningProbe> {
        self.start_probe_from(opts, &self.node, true)
    }

    /// [`Lab::probe_from`] started in the background.
    pub fn start_probe_from(
        &self,
        opts: &ProbeOptions,
        netns: &Netns,
        in_cgroup: bool,
    ) -> anyhow::Result<RunningProbe> {
        let mut cmd = self.probe_command(opts, netns, in_cgroup)?;
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        Ok(RunningProbe(ChildGuard(
            cmd.spawn().context("starting lb-lab probe")?,
        )))
    }

    /// Stops the server of pod `i` (its address stays, nothing answers there any more).
    pub fn stop_server(&mut self, i: usize) {
        self.pods[i].server = None;
    }

    /// Starts `cmd` inside pod `i`'s namespace; it is killed when the lab is dropped.
    pub fn spawn_in_pod(&mut self, i: usize, mut cmd: Command) -> anyhow::Result<()> {
        place(&mut cmd, &self.pods[i].netns, None)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {cmd:?} in pod-{i}"))?;
        self.pods[i].extra.push(ChildGuard(child));
        Ok(())
    }

    /// Runs `cmd` to completion as a client: in the node namespace and the client cgroup.
    pub fn run_client(&self, mut cmd: Command) -> anyhow::Result<String> {
        place(&mut cmd, &self.node, Some(&self.cgroup))?;
        run(&mut cmd)
    }
}

/// `lb-lab udp-socket` running as a client (node namespace, client cgroup): one
/// unconnected UDP socket, driven line by line.
pub struct UdpSocketClient {
    child: ChildGuard,
    reader: BufReader<std::process::ChildStdout>,
}

impl UdpSocketClient {
    /// Sends `line` (`send N`, `queue`, `read`) and returns what the socket got.
    pub fn ask(&mut self, line: &str) -> anyhow::Result<ProbeReport> {
        let stdin = self.child.0.stdin.as_mut().context("piped")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        serde_json::from_str(answer.trim())
            .with_context(|| format!("lb-lab udp-socket answered {line:?} with {answer:?}"))
    }
}

impl Lab {
    /// Starts a [`UdpSocketClient`] sending to `target`.
    pub fn udp_socket(&self, target: SocketAddr) -> anyhow::Result<UdpSocketClient> {
        let mut cmd = Command::new(&self.lab_bin);
        cmd.args(["udp-socket", "--target", &target.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, &self.node, Some(&self.cgroup))?;
        let mut child = ChildGuard(cmd.spawn().context("starting lb-lab udp-socket")?);
        let reader = BufReader::new(child.0.stdout.take().context("piped")?);
        Ok(UdpSocketClient { child, reader })
    }
}

/// A probe running in the background.
pub struct RunningProbe(ChildGuard);

impl RunningProbe {
    /// Whether the probe is still going (it has not exited yet).
    pub fn is_running(&mut self) -> bool {
        matches!(self.0.0.try_wait(), Ok(None))
    }

    /// Waits for the probe to end and returns its report.
    pub fn finish(self) -> anyhow::Result<ProbeReport> {
        json_report(self.0, "lb-lab probe")
    }
}

/// Waits for `child` (`what`, started with its stdout piped) and reads the JSON report it
/// printed.
pub(crate) fn json_report<T: serde::de::DeserializeOwned>(
    mut child: ChildGuard,
    what: &str,
) -> anyhow::Result<T> {
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .with_context(|| format!("{what}'s output"))?
        .read_to_string(&mut out)?;
    let status = child.0.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    serde_json::from_str(out.trim()).with_context(|| format!("{what} printed {out:?}"))
}

/// How a probe talks to its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// connect, send a line, read the reply to EOF.
    Tcp,
    /// A connected UDP socket: send, recv.
    UdpConnected,
    /// An unconnected UDP socket: sendto, recvfrom.
    UdpSendto,
    /// One connected UDP socket for every exchange: one flow of `count` datagrams.
    UdpFlow,
    /// One unconnected UDP socket for every exchange: sendto, recvfrom (the reply must
    /// come from the target), `count` times.
    UdpSendtoFlow,
}

/// What one probe run does.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub target: SocketAddr,
    pub count: usize,
    pub timeout: Duration,
    pub mode: ProbeMode,
    /// The source port (0: any), so two runs can be one flow (UDP) or one tuple (TCP).
    pub source_port: u16,
    /// A pause after each exchange (a client that keeps going while things change).
    pub interval: Duration,
    /// UDP: the size of each datagram, request and reply alike (0: a short line).
    pub size: usize,
}

impl ProbeOptions {
    pub fn tcp(target: impl Into<SocketAddr>, count: usize) -> Self {
        Self {
            target: target.into(),
            count,
            timeout: Duration::from_secs(1),
            mode: ProbeMode::Tcp,
            source_port: 0,
            interval: Duration::ZERO,
            size: 0,
        }
    }

    pub fn with_mode(self, mode: ProbeMode) -> Self {
        Self { mode, ..self }
    }
}

/// Which server answered how often, and which errors happened how often.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub replies: BTreeMap<String, usize>,
    pub errors: BTreeMap<String, usize>,
    /// When each failed exchange began, in ms since the probe began (to tell whether
    /// failures fall in a window the test knows, such as a restart).
    #[serde(default)]
    pub errors_at_ms: Vec<u64>,
}

impl ProbeReport {
    pub fn total_replies(&self) -> usize {
        self.replies.values().sum()
    }

    pub fn total_errors(&self) -> usize {
        self.errors.values().sum()
    }
}

fn error_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EAGAIN) => "timeout".into(),
        Some(n) => format!("errno {n}"),
        None if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        None if e.kind() == std::io::ErrorKind::Other => e.to_string(),
        None => e.kind().to_string(),
    }
}

fn mismatch(what: &str, got: SocketAddr, target: SocketAddr) -> std::io::Error {
    std::io::Error::other(format!("{what} {got}, not {target}"))
}

/// One TCP exchange: connect, send a line, read the reply to EOF (the server closes).
/// getpeername() must report the address the client connected to.
fn probe_tcp_once(target: SocketAddr, timeout: Duration, port: u16) -> std::io::Result<String> {
    let mut s = if port == 0 {
        TcpStream::connect_timeout(&target, timeout)?
    } else {
        tcp_connect_from(target, port, timeout)?
    };
    let peer = s.peer_addr()?;
    if peer != target {
        return Err(mismatch("getpeername", peer, target));
    }
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.trim().to_string())
}

/// A TCP connection to the IPv4 `target` from local port `port` (SO_REUSEADDR), within
/// `timeout`.
fn tcp_connect_from(
    target: SocketAddr,
    port: u16,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = target else {
        return Err(std::io::Error::other(
            "a TCP source port: IPv4 targets only",
        ));
    };
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let check = |r: i32| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor we own (handed to TcpStream, which
    // closes it; closed here on failure).
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        ))?;
        stream.set_write_timeout(Some(timeout))?;
        let local = sin(Ipv4Addr::UNSPECIFIED, port);
        check(libc::bind(fd, (&raw const local).cast(), len))?;
        let remote = sin(*v4.ip(), v4.port());
        // A blocking connect() gives up after SO_SNDTIMEO.
        check(libc::connect(fd, (&raw const remote).cast(), len))?;
        Ok(stream)
    }
}

/// One UDP exchange on a connected socket; getpeername() must report the target.
/// An unbound UDP socket of the target's family.
pub(crate) fn udp_socket_for(target: SocketAddr, port: u16) -> std::io::Result<UdpSocket> {
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    UdpSocket::bind((any, port))
}

fn probe_udp_once(target: SocketAddr, timeout: Duration, size: usize) -> std::io::Result<String> {
    udp_exchange(&connected_udp(target, 0)?, timeout, size)
}

/// The datagram a UDP probe sends: a short line, or with `size`, `SIZE n` padded to
/// `size` bytes (the server answers with as many).
fn udp_request(size: usize) -> Vec<u8> {
    if size == 0 {
        return b"hello\n".to_vec();
    }
    let mut req = format!("SIZE {size}\n").into_bytes();
    req.resize(size.max(req.len()), b'.');
    req
}

/// The reply's first line, after checking its size (`size` 0: any).
fn udp_reply(buf: &[u8], size: usize) -> std::io::Result<String> {
    if size != 0 && buf.len() != size {
        return Err(std::io::Error::other(format!(
            "a reply of {} bytes, not {size}",
            buf.len()
        )));
    }
    let text = String::from_utf8_lossy(buf);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// A UDP socket from `source_port` (0: any) connected to `target`; getpeername() must
/// report the target.
fn connected_udp(target: SocketAddr, source_port: u16) -> std::io::Result<UdpSocket> {
    let s = udp_socket_for(target, source_port)?;
    s.connect(target)?;
    let peer = s.peer_addr()?;
    if peer != target {
        return Err(mismatch("getpeername", peer, target));
    }
    Ok(s)
}

/// One datagram out and its reply, on a connected socket.
fn udp_exchange(s: &UdpSocket, timeout: Duration, size: usize) -> std::io::Result<String> {
    s.set_read_timeout(Some(timeout))?;
    s.send(&udp_request(size))?;
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf)?;
    udp_reply(&buf[..n], size)
}

/// One UDP exchange on an unconnected socket (sendto/recvfrom, as DNS resolvers do);
/// the reply must come from the target address.
fn probe_udp_sendto_once(
    target: SocketAddr,
    timeout: Duration,
    size: usize,
) -> std::io::Result<String> {
    sendto_exchange(&udp_socket_for(target, 0)?, target, timeout, size)
}

/// One datagram to `target` on an unconnected socket and its reply, which must come
/// from `target`.
fn sendto_exchange(
    s: &UdpSocket,
    target: SocketAddr,
    timeout: Duration,
    size: usize,
) -> std::io::Result<String> {
    s.send_to(&udp_request(size), target)?;
    udp_receive(s, target, timeout, size)
}

/// The next datagram `s` receives (within `timeout`), which must come from `target`.
fn udp_receive(
    s: &UdpSocket,
    target: SocketAddr,
    timeout: Duration,
    size: usize,
) -> std::io::Result<String> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf)?;
    if from != target {
        return Err(mismatch("reply from", from, target));
    }
    udp_reply(&buf[..n], size)
}

/// `lb-lab udp-socket`: one unconnected UDP socket to `target`, driven by lines on
/// stdin, each answered with a [`ProbeReport`] (JSON line) of what it did:
/// * `send N`: N exchanges (sendto, recvfrom);
/// * `queue`: one datagram sent, its reply left in the socket's receive queue;
/// * `read`: one datagram received (the queued reply).
///
/// A reply from another address than `target` counts as an error. Each receive waits
/// at most `timeout`; ends at the end of stdin.
pub fn udp_socket(target: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let s = udp_socket_for(target, 0)?;
    for line in std::io::stdin().lines() {
        let line = line?;
        let mut report = ProbeReport::default();
        let mut note = |r: std::io::Result<String>| match r {
            Ok(name) => *report.replies.entry(name).or_default() += 1,
            Err(e) => *report.errors.entry(error_name(&e)).or_default() += 1,
        };
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["send", n] => {
                let n: usize = n.parse().with_context(|| format!("{line:?}: a count"))?;
                for _ in 0..n {
                    note(sendto_exchange(&s, target, timeout, 0));
                }
            }
            ["queue"] => {
                if let Err(e) = s.send_to(&udp_request(0), target) {
                    note(Err(e));
                }
            }
            ["read"] => note(udp_receive(&s, target, timeout, 0)),
            _ => bail!("{line:?}: not `send N`, `queue` or `read`"),
        }
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// `lb-lab probe`: `count` exchanges in a row, bounded by `timeout` each.
pub fn probe(opts: &ProbeOptions) -> ProbeReport {
    let mut report = ProbeReport::default();
    let flow = match opts.mode {
        ProbeMode::UdpFlow => Some(connected_udp(opts.target, opts.source_port)),
        ProbeMode::UdpSendtoFlow => Some(udp_socket_for(opts.target, opts.source_port)),
        _ => None,
    };
    let flow = match flow.transpose() {
        Ok(f) => f,
        Err(e) => {
            *report.errors.entry(error_name(&e)).or_default() += opts.count;
            return report;
        }
    };
    let start = Instant::now();
    for _ in 0..opts.count {
        let began = start.elapsed().as_millis() as u64;
        let result = match (opts.mode, &flow) {
            (ProbeMode::UdpFlow, Some(s)) => udp_exchange(s, opts.timeout, opts.size),
            (ProbeMode::UdpSendtoFlow, Some(s)) => {
                sendto_exchange(s, opts.target, opts.timeout, opts.size)
            }
            (ProbeMode::UdpConnected | ProbeMode::UdpFlow, _) => {
                probe_udp_once(opts.target, opts.timeout, opts.size)
            }
            (ProbeMode::Tcp, _) => probe_tcp_once(opts.target, opts.timeout, opts.source_port),
            (ProbeMode::UdpSendto | ProbeMode::UdpSendtoFlow, _) => {
                probe_udp_sendto_once(opts.target, opts.timeout, opts.size)
            }
        };
        match result {
            Ok(name) => *report.replies.entry(name).or_default() += 1,
            Err(e) => {
                *report.errors.entry(error_name(&e)).or_default() += 1;
                report.errors_at_ms.push(began);
            }
        }
        std::thread::sleep(opts.interval);
    }
    report
}

/// `lb-lab serve`: answers every TCP connection and every UDP datagram on `port`, IPv4
/// and IPv6 (dual-stack sockets), with `name` (and, with `say_peer`, "from" and the
/// address the request came from). Prints "ready" once both sockets are bound; runs
/// until killed.
///
/// A TCP request line `ECHO N` gets the reply line, then the next N bytes echoed back
/// (a transfer both ways, on a thread of its own); any other line just the reply.
pub fn serve(name: &str, port: u16, say_peer: bool) -> anyhow::Result<()> {
    let (tcp, reply) = start_server(name, port, say_peer)?;
    for conn in tcp.incoming() {
        let Ok(conn) = conn else { continue };
        let line = reply_line(&reply, say_peer, conn.peer_addr().ok());
        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reader = BufReader::new(conn);
        let mut request = String::new();
        let _ = reader.read_line(&mut request);
        match request
            .strip_prefix("ECHO ")
            .map(|n| n.trim().parse::<u64>())
        {
            Some(Ok(n)) => {
                std::thread::spawn(move || echo(reader, &line, n));
            }
            _ => {
                let _ = reader.get_mut().write_all(line.as_bytes());
            }
        }
    }
    Ok(())
}

/// The reply line, then `n` bytes from the client back to it.
fn echo(mut reader: BufReader<TcpStream>, line: &str, n: u64) {
    let mut writer = match reader.get_ref().try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    // Longer than any pause a test makes halfway (a minute under emulation), so that
    // the server never ends a transfer the client has only paused.
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(300)));
    if writer.write_all(line.as_bytes()).is_ok() {
        let _ = std::io::copy(&mut (&mut reader).take(n), &mut writer);
    }
}

/// The byte at offset `i` of a transfer whose connection has `seed` (its local port):
/// bytes of one connection never pass for another's.
fn pattern(seed: u64, i: u64) -> u8 {
    // splitmix64 of (seed, i / 8), one byte per position.
    let mut z = ((seed << 48) ^ (i / 8)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> ((i % 8) * 8)) as u8
}

/// What one `lb-lab transfer` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransferReport {
    /// The server's reply line (who answered, and whom it saw).
    pub reply: String,
    pub sent: u64,
    /// Echoed bytes received back, and whether every one was the byte sent.
    pub received: u64,
    pub intact: bool,
    pub error: Option<String>,
    /// From connect to the last byte back.
    #[serde(default)]
    pub elapsed_ns: u64,
}

/// `lb-lab transfer`: `bytes` to `target` and back through one TCP connection, pausing
/// `pause` halfway (so a test can change things mid-flow), bounded by `timeout` per read.
pub fn transfer(
    target: SocketAddr,
    bytes: u64,
    pause: Duration,
    timeout: Duration,
) -> TransferReport {
    let mut report = TransferReport::default();
    let start = Instant::now();
    if let Err(e) = run_transfer(target, bytes, pause, timeout, &mut report) {
        report.error = Some(format!("{}: {e}", error_name(&e)));
    }
    report.elapsed_ns = start.elapsed().as_nanos() as u64;
    report
}

fn run_transfer(
    target: SocketAddr,
    bytes: u64,
    pause: Duration,
    timeout: Duration,
    report: &mut TransferReport,
) -> std::io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&target, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    conn.write_all(format!("ECHO {bytes}\n").as_bytes())?;
    let seed = u64::from(conn.local_addr()?.port());
    let reader = conn.try_clone()?;
    let checker = std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let (mut received, mut intact) = (0u64, true);
        let mut buf = [0u8; 65536];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            intact &= buf[..n]
                .iter()
                .enumerate()
                .all(|(k, b)| *b == pattern(seed, received + k as u64));
            received += n as u64;
        }
        Ok::<_, std::io::Error>((line.trim().to_string(), received, intact))
    });
    let mut chunk = vec![0u8; 65536];
    let mut sent = 0u64;
    let mut paused = false;
    while sent < bytes {
        if !paused && sent >= bytes / 2 {
            std::thread::sleep(pause);
            paused = true;
        }
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(seed, sent + k as u64);
        }
        conn.write_all(&chunk[..n])?;
        sent += n as u64;
        report.sent = sent;
    }
    let (reply, received, intact) = checker
        .join()
        .map_err(|_| std::io::Error::other("the reader panicked"))??;
    report.reply = reply;
    report.received = received;
    report.intact = intact && received == bytes;
    Ok(())
}

/// Binds TCP and UDP `port` on dual-stack sockets, answers every UDP datagram with
/// `name` from a thread, prints "ready", and returns the TCP listener and the reply line
/// for the caller's own TCP protocol.
pub(crate) fn start_server(
    name: &str,
    port: u16,
    say_peer: bool,
) -> anyhow::Result<(TcpListener, String)> {
    let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding TCP port {port}"))?;
    let udp = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding UDP port {port}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let reply = format!("{name}\n");
    let udp_reply = reply.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let mut line = reply_line(&udp_reply, say_peer, Some(peer)).into_bytes();
            // "SIZE n": the reply padded to n bytes (a datagram the IP layer fragments).
            if let Some(size) = String::from_utf8_lossy(&buf[..n.min(32)])
                .strip_prefix("SIZE ")
                .and_then(|r| r.lines().next()?.trim().parse::<usize>().ok())
            {
                line.resize(size.clamp(line.len(), 65_000), b'.');
            }
            let _ = udp.send_to(&line, peer);
        }
    });
    Ok((tcp, reply))
}

/// `reply` ("name\n"), or "name from ADDR\n" with the peer's address (IPv4-mapped
/// shown as IPv4).
fn reply_line(reply: &str, say_peer: bool, peer: Option<SocketAddr>) -> String {
    match peer.filter(|_| say_peer) {
        Some(p) => format!("{} from {}\n", reply.trim_end(), p.ip().to_canonical()),
        None => reply.to_string(),
    }
}

/// GET http://`target``path`: the status code and the body (one line, as sent).
pub fn http_get(target: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_as(target, &target.to_string(), path)
}

/// [`http_get`] with `Host: host` (an ingress routes by it).
pub fn http_get_as(target: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .with_context(|| format!("connecting to {target}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.trim().to_string()))
}

/// The running agent, as a process: stopped with SIGTERM on drop, and everything it
/// pinned removed (the programs detached).
pub struct AgentProcess {
    pub child: ChildGuard,
    pub pin_path: PathBuf,
    pub log_path: PathBuf,
    /// Set by [`AgentProcess::kill`]: the pins stay for the next agent.
    keep_pins: bool,
    /// How it was started, for [`AgentProcess::restart`].
    agent_bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    netns: Option<String>,
}

/// `agent_bin ARGS`, in the named network namespace if given, logging to `log_path`.
fn spawn_agent(
    agent_bin: &Path,
    args: &[std::ffi::OsString],
    netns: Option<&str>,
    log_path: &Path,
) -> anyhow::Result<ChildGuard> {
    let log = File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(agent_bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(name) = netns {
        let path = format!("/var/run/netns/{name}");
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        place_file(&mut cmd, file, None)?;
    }
    Ok(ChildGuard(
        cmd.spawn().with_context(|| format!("starting {cmd:?}"))?,
    ))
}

/// How [`AgentProcess::restart`] stops the running agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL, as a crash or an OOM kill would.
    Kill,
    /// SIGTERM, as the kubelet does (a rolling update, a node drain).
    Term,
}

impl AgentProcess {
    /// Starts `agent_bin run ARGS...` (`--manifests DIR` or `--kubeconfig FILE`, and any
    /// other flags), attached to `cgroup`, logging to a file.
    pub fn start(
        agent_bin: &Path,
        source_args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pin_path: &Path,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_in(None, agent_bin, source_args, cgroup, pin_path, log_path)
    }

    /// [`AgentProcess::start`], inside `netns` when given (a node of a cluster lab: its
    /// interfaces are that namespace's).
    pub fn start_in(
        netns: Option<&Netns>,
        agent_bin: &Path,
        source_args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pin_path: &Path,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
        args.extend(source_args.iter().map(|a| a.to_os_string()));
        args.extend([
            "--cgroup".into(),
            cgroup.into(),
            "--pin-path".into(),
            pin_path.into(),
        ]);
        // Test defaults, unless the caller sets them.
        for (flag, default) in [
            ("--metrics-bind-address", ""),
            ("--healthz-bind-address", ""),
            ("--min-sync-period", "200ms"),
            ("--poll-interval-ms", "100"),
        ] {
            if !source_args.iter().any(|a| *a == flag) {
                args.extend([flag.into(), default.into()]);
            }
        }
        let netns = netns.map(|n| n.name.clone());
        let child = spawn_agent(agent_bin, &args, netns.as_deref(), log_path)?;
        Ok(Self {
            child,
            pin_path: pin_path.to_path_buf(),
            log_path: log_path.to_path_buf(),
            keep_pins: false,
            agent_bin: agent_bin.to_path_buf(),
            args,
            netns,
        })
    }

    /// [`AgentProcess::restart`] with another agent binary (an upgrade).
    pub fn upgrade(
        &mut self,
        agent_bin: &Path,
        stop: Stop,
        down: Duration,
        log_path: &Path,
    ) -> anyhow::Result<()> {
        self.agent_bin = agent_bin.to_path_buf();
        self.restart(stop, down, &[], log_path)
    }

    /// Stops the agent as `stop` says, leaving what it pinned; after `down`, starts it
    /// again with the same arguments and `extra` ones (an upgrade's), logging to
    /// `log_path`. Does not wait for its first sync.
    pub fn restart(
        &mut self,
        stop: Stop,
        down: Duration,
        extra: &[&str],
        log_path: &Path,
    ) -> anyhow::Result<()> {
        match stop {
            Stop::Kill => {
                let _ = self.child.0.kill();
                let _ = self.child.0.wait();
            }
            Stop::Term => {
                let status = self.child.terminate(Duration::from_secs(5));
                if !status.is_some_and(|s| s.success()) {
                    bail!(
                        "the agent did not exit cleanly on SIGTERM ({status:?}):\n{}",
                        self.log()
                    );
                }
            }
        }
        std::thread::sleep(down);
        let mut args = self.args.clone();
        args.extend(extra.iter().map(Into::into));
        self.child = spawn_agent(&self.agent_bin, &args, self.netns.as_deref(), log_path)?;
        self.log_path = log_path.to_path_buf();
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the agent has synced `n` times (counted in its log), or fails with its log.
    pub fn wait_synced(&mut self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(" synced").count() >= n {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                bail!(
                    "the agent exited ({status}) before syncing:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("the agent did not sync within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Syncs logged so far.
    pub fn syncs(&self) -> usize {
        self.log().matches(" synced").count()
    }

    /// Waits until a sync after the first `before` ones is logged (take `before` from
    /// [`Self::syncs`] before making the change): never satisfied by a sync that came
    /// before the change.
    pub fn wait_sync_after(&mut self, before: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_synced(before + 1, timeout)
    }

    /// SIGTERM and wait; returns the exit status (None if it had to be killed).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.terminate(Duration::from_secs(5))
    }

    /// SIGKILL, as a crash or an OOM kill would; what it pinned stays for the next agent.
    pub fn kill(mut self) {
        self.keep_pins = true;
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        if !self.keep_pins {
            lb_user::datapath::loader::remove_pins(&self.pin_path);
        }
    }
}

/// Waits (bounded) until `f` returns `Some`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
