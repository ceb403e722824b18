//! Many client pods holding many sockets, for the stale-socket closer: each pod is a
//! network namespace with a cgroup of its own under the lab's (as kubelet nests pods
//! under kubepods), and a `lb-lab hold-many` process in it with connected UDP sockets to
//! a service. The namespaces have no route out: a dummy interface takes every packet
//! (none is sent: a UDP connect() only picks the peer).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::lab::{Cgroup, ChildGuard, Netns, place};

/// What `lb-lab hold-many` reports: sockets connected, and (after "check") how many of
/// them have the error a destroyed socket gives (ECONNABORTED).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeldMany {
    pub sockets: usize,
    pub aborted: usize,
}

/// `lb-lab hold-many`: `count` UDP sockets connected to `target`; prints [`HeldMany`]
/// (JSON), then again for each line on stdin with the sockets' errors counted (each
/// socket's pending error is read once: a later "check" counts only new ones, so the
/// counts add up); ends at the end of stdin.
pub fn hold_many(target: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)
            .with_context(|| format!("connecting socket {i} to {target}"))?;
        sockets.push(s);
    }
    let mut out = std::io::stdout();
    let mut held = HeldMany {
        sockets: sockets.len(),
        aborted: 0,
    };
    writeln!(out, "{}", serde_json::to_string(&held)?)?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        line?;
        held.aborted += sockets
            .iter()
            .filter(|s| {
                s.take_error()
                    .ok()
                    .flatten()
                    .is_some_and(|e| e.raw_os_error() == Some(libc::ECONNABORTED))
            })
            .count();
        writeln!(out, "{}", serde_json::to_string(&held)?)?;
        out.flush()?;
    }
    Ok(())
}

/// A client pod: its namespace (with a veth pair inside as the only way out), its
/// cgroup under the lab's, and the `hold-many` process in both.
pub struct ClientPod {
    holder: Holder,
    // Dropped after the process: the cgroup empties first, then goes.
    _cgroup: Cgroup,
    _netns: Netns,
}

struct Holder {
    child: ChildGuard,
    reader: BufReader<std::process::ChildStdout>,
}

impl ClientPod {
    /// Pod `i` of the lab `prefix` whose cgroup is `lab_cgroup`, with `sockets` UDP
    /// sockets connected to `target` through the agent's programs.
    pub fn start(
        lab_bin: &Path,
        prefix: &str,
        lab_cgroup: &Cgroup,
        i: usize,
        target: SocketAddr,
        sockets: usize,
    ) -> anyhow::Result<Self> {
        let netns = Netns::create(&format!("{prefix}-c{i}"))?;
        // A veth pair with both ends inside: what leaves by one end dies at the other.
        netns.ip(&["link", "add", "o0", "type", "veth", "peer", "name", "o1"])?;
        let addr = format!("10.253.{}.{}/32", i / 250, i % 250 + 1);
        netns.ip(&["addr", "add", &addr, "dev", "o0"])?;
        netns.ip(&["link", "set", "o0", "up"])?;
        netns.ip(&["route", "add", "default", "dev", "o0"])?;
        let root = lab_cgroup
            .path
            .file_name()
            .context("the lab cgroup has a name")?;
        let cgroup = Cgroup::create(&format!("{}/c{i}", root.to_string_lossy()))?;
        let mut cmd = Command::new(lab_bin);
        cmd.args(["hold-many", "--target", &target.to_string()])
            .args(["--sockets", &sockets.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        place(&mut cmd, &netns, Some(&cgroup))?;
        let mut child = ChildGuard(cmd.spawn().context("starting lb-lab hold-many")?);
        let reader = BufReader::new(child.0.stdout.take().context("piped")?);
        let mut pod = Self {
            holder: Holder { child, reader },
            _cgroup: cgroup,
            _netns: netns,
        };
        let first = pod.report()?;
        anyhow::ensure!(
            first.sockets == sockets,
            "client pod {i}: {first:?}, not {sockets} sockets"
        );
        Ok(pod)
    }

    fn report(&mut self) -> anyhow::Result<HeldMany> {
        let mut line = String::new();
        self.holder.reader.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("lb-lab hold-many said {line:?}"))
    }

    /// The sockets closed under it so far (ECONNABORTED).
    pub fn check(&mut self) -> anyhow::Result<HeldMany> {
        let stdin = self.holder.child.0.stdin.as_mut().context("piped")?;
        writeln!(stdin, "check")?;
        stdin.flush()?;
        self.report()
    }
}
