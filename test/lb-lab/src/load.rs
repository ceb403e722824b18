//! The load generator and the servers it talks to (run inside the lab's namespaces by
//! `lb-lab load`, `lb-lab serve --bench` and `lb-lab waiter`).

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Barrier,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::lab;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadMode {
    /// connect, send a request, read the reply, close (the client closes first).
    Tcp,
    /// A new UDP socket per request: sendto, recvfrom.
    Udp,
}

impl LoadMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One load run: `clients` clients, each `count` requests one after the other,
/// round-robin over the targets; the latencies of every client together.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests, every client's.
    pub count: usize,
    pub errors: usize,
    pub elapsed_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    #[serde(default)]
    pub clients: usize,
    /// The machine's busy CPU time (µs, `/proc/stat`, steal excluded) while the clients
    /// ran: client, servers and the kernel's work between them.
    #[serde(default)]
    pub cpu_us: f64,
    /// The clients' own CPU time (their threads', user and system: the system calls
    /// and the socket programs they run) over the counted requests, ns. Other load on
    /// the machine barely moves it, unlike a rate.
    #[serde(default)]
    pub client_cpu_ns: u64,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        (self.count - self.errors) as f64 / (self.elapsed_ns as f64 / 1e9)
    }

    /// How many CPUs the machine kept busy on average while the clients ran.
    pub fn busy_cores(&self) -> f64 {
        self.cpu_us * 1e3 / self.elapsed_ns as f64
    }

    /// The clients' own CPU per successful request (µs); NaN when nothing succeeded.
    pub fn client_cpu_us_per_request(&self) -> f64 {
        match self.count - self.errors {
            0 => f64::NAN,
            ok => self.client_cpu_ns as f64 / 1e3 / ok as f64,
        }
    }

    /// Busy CPU per successful request (µs); NaN when nothing succeeded.
    pub fn cpu_us_per_request(&self) -> f64 {
        match self.count - self.errors {
            0 => f64::NAN,
            ok => self.cpu_us / ok as f64,
        }
    }
}

/// What one `lb-lab load` run does.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub targets: Vec<SocketAddr>,
    /// Requests per client.
    pub count: usize,
    pub mode: LoadMode,
    pub timeout: Duration,
    /// Requests each client makes before the clock starts (not counted): the servers,
    /// caches and neighbour entries warm whichever variant ran before.
    pub warmup: usize,
    /// Clients running at once, each a thread of its own.
    pub clients: usize,
    /// Each request to a target drawn at random (else round-robin): the pattern a
    /// service's random backend choice gives, for the direct variants to match it.
    pub random: bool,
    /// The CPU the clients run on (every CPU: `None`).
    pub cpu: Option<usize>,
}

impl LoadSpec {
    pub fn new(targets: &[SocketAddr], count: usize, mode: LoadMode) -> Self {
        Self {
            targets: targets.to_vec(),
            count,
            mode,
            timeout: Duration::from_secs(1),
            warmup: 0,
            clients: 1,
            random: false,
            cpu: None,
        }
    }

    /// The `lb-lab load` arguments that run this.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "load",
            "--count",
            &self.count.to_string(),
            "--mode",
            self.mode.name(),
            "--warmup",
            &self.warmup.to_string(),
            "--clients",
            &self.clients.to_string(),
        ]
        .map(String::from)
        .into();
        if self.random {
            args.push("--random".into());
        }
        if let Some(cpu) = self.cpu {
            args.extend(["--cpu".into(), cpu.to_string()]);
        }
        for t in &self.targets {
            args.extend(["--target".into(), t.to_string()]);
        }
        args
    }
}

/// One request; the reply line (the server's name).
fn tcp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET\n")?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        let n = s.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            break;
        }
        got += n;
    }
    Ok(String::from_utf8_lossy(&buf[..got]).trim().to_string())
}

fn udp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let s = lab::udp_socket_for(target, 0)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"GET\n", target)?;
    let mut buf = [0u8; 64];
    s.recv_from(&mut buf)?;
    Ok(())
}

fn request(mode: LoadMode, target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    match mode {
        LoadMode::Tcp => tcp_once(target, timeout).map(drop),
        LoadMode::Udp => udp_once(target, timeout),
    }
}

/// A small pseudo-random sequence (xorshift64*), seeded from the clock and `salt`.
struct Xorshift(u64);

impl Xorshift {
    fn seeded(salt: usize) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self((now ^ (salt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32
    }
}

/// One client: `warmup` requests, then waits at `start` and makes `count` requests,
/// round-robin over the targets from `first`; their latencies (ns), the errors and the
/// thread's CPU time (ns).
fn client(spec: &LoadSpec, first: usize, start: &Barrier) -> (Vec<u64>, usize, u64) {
    let mut draw = Xorshift::seeded(first);
    let mut target = |i: usize| {
        let k = if spec.random {
            draw.next() as usize
        } else {
            first + i
        };
        spec.targets[k % spec.targets.len()]
    };
    for i in 0..spec.warmup {
        let _ = request(spec.mode, target(i), spec.timeout);
    }
    start.wait();
    let cpu0 = thread_cpu_ns();
    let mut lat = Vec::with_capacity(spec.count);
    let mut errors = 0;
    for i in 0..spec.count {
        let t0 = Instant::now();
        match request(spec.mode, target(i), spec.timeout) {
            Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
            Err(_) => errors += 1,
        }
    }
    (lat, errors, thread_cpu_ns().saturating_sub(cpu0))
}

/// The CPU time (user and system) the calling thread has used, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `lb-lab load`: the load generator. The clients start together once each has warmed
/// up; the clock and the CPU reading cover them from then until the last one ends.
pub fn load(spec: &LoadSpec) -> LoadReport {
    if let Some(cpu) = spec.cpu {
        // Before the client threads start: they inherit it.
        if let Err(e) = lab::set_affinity(std::process::id(), Some(cpu)) {
            eprintln!("load: running on CPU {cpu}: {e:#}");
        }
    }
    let clients = spec.clients.max(1);
    if spec.targets.is_empty() {
        return LoadReport::default();
    }
    let start = Barrier::new(clients + 1);
    let (results, elapsed_ns, cpu_us) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let start = &start;
                scope.spawn(move || client(spec, c, start))
            })
            .collect();
        start.wait();
        let (t0, cpu0) = (Instant::now(), crate::bench::busy_cpu_us().ok());
        let results: Vec<(Vec<u64>, usize, u64)> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| (Vec::new(), spec.count, 0)))
            .collect();
        let elapsed_ns = t0.elapsed().as_nanos() as u64;
        let cpu_us = match (cpu0, crate::bench::busy_cpu_us().ok()) {
            (Some(a), Some(b)) => b - a,
            // JSON has no NaN: 0 reads as "below /proc/stat's resolution".
            _ => 0.0,
        };
        (results, elapsed_ns, cpu_us)
    });
    let errors = results.iter().map(|r| r.1).sum();
    let client_cpu_ns = results.iter().map(|r| r.2).sum();
    let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.0).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
        }
    };
    LoadReport {
        count: spec.count * clients,
        errors,
        elapsed_ns,
        p50_ns: pct(0.50),
        p99_ns: pct(0.99),
        clients,
        cpu_us,
        client_cpu_ns,
    }
}

/// `lb-lab serve --bench`: read the request line, answer with the name, then wait for
/// the client to close first. Several threads accept, so a client never waits on a
/// previous connection's close. A request `ECHO N` (a bulk transfer, see
/// [`lab::transfer`]) gets the name, then the next N bytes echoed back, then a close.
pub fn serve_bench(name: &str, port: u16) -> anyhow::Result<()> {
    let (tcp, reply) = lab::start_server(name, port, false)?;
    let mut threads = Vec::new();
    for _ in 0..4 {
        let listener = tcp.try_clone()?;
        let reply = reply.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = answer_bench(conn, &reply);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One connection of [`serve_bench`].
fn answer_bench(conn: TcpStream, reply: &str) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = std::io::BufReader::new(conn);
    let mut request = Vec::new();
    (&mut reader).take(64).read_until(b'\n', &mut request)?;
    writer.write_all(reply.as_bytes())?;
    let echo = std::str::from_utf8(&request)
        .ok()
        .and_then(|r| r.trim().strip_prefix("ECHO "))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(n) = echo {
        // The transfer reads until this side closes.
        std::io::copy(&mut (&mut reader).take(n), &mut writer)?;
        return Ok(());
    }
    // Until EOF: the client closes first.
    let mut buf = [0u8; 64];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

/// `lb-lab waiter`: for each name read from stdin, connects to `target` again and again
/// until that server answers (at most 5 s), then prints "ok" (or "timeout").
pub fn waiter(target: SocketAddr) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let want = line?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ok = false;
        while Instant::now() < deadline {
            if tcp_once(target, Duration::from_secs(1)).is_ok_and(|name| name == want.trim()) {
                ok = true;
                break;
            }
        }
        writeln!(out, "{}", if ok { "ok" } else { "timeout" })?;
        out.flush()?;
    }
    Ok(())
}

/// What [`hold`] reports of its three sockets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Held {
    /// Who answered first: the TCP connection and the connected UDP socket to the
    /// service, and the UDP socket connected to a pod directly.
    pub tcp: String,
    pub udp: String,
    pub direct: String,
    /// After "check": the first error each socket gave ("none": none within the wait).
    pub tcp_error: String,
    pub udp_error: String,
    pub direct_error: String,
    /// The direct socket's answer to one more request after the check.
    pub direct_after: String,
}

/// `lb-lab hold`: a TCP connection and a connected UDP socket to `service`, and a UDP
/// socket connected to the pod `direct`; prints who answered each (JSON), keeps them
/// (the TCP connection an echo, busy with a byte every 300 ms) until a line on stdin, then
/// prints the first error each gave within 3 s (JSON).
pub fn hold(service: SocketAddr, direct: SocketAddr) -> anyhow::Result<()> {
    use std::net::UdpSocket;
    let wait = Duration::from_secs(3);
    let mut tcp = TcpStream::connect_timeout(&service, wait)?;
    tcp.set_read_timeout(Some(wait))?;
    // The pod server answers its name, then echoes what comes (the connection stays).
    tcp.write_all(b"ECHO 1000000\n")?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') && got < buf.len() {
        match tcp.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let mut held = Held {
        tcp: String::from_utf8_lossy(&buf[..got]).trim().to_string(),
        ..Held::default()
    };
    let udp_ask = |s: &UdpSocket| -> std::io::Result<String> {
        s.send(b"GET\n")?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    };
    let connected = |to: SocketAddr| -> std::io::Result<UdpSocket> {
        let s = lab::udp_socket_for(to, 0)?;
        s.connect(to)?;
        s.set_read_timeout(Some(wait))?;
        Ok(s)
    };
    let udp = connected(service)?;
    held.udp = udp_ask(&udp)?;
    let direct_sock = connected(direct)?;
    held.direct = udp_ask(&direct_sock)?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", serde_json::to_string(&held)?)?;
    out.flush()?;
    // Keep the connection busy (the pod server gives up on an idle one after 10 s); the
    // first write error is the connection's error.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keepalive = {
        let (mut conn, stop) = (tcp.try_clone()?, stop.clone());
        std::thread::spawn(move || -> Option<std::io::Error> {
            for _ in 0..200 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                if let Err(e) = conn.write_all(b".") {
                    return Some(e);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            None
        })
    };
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let describe = |r: std::io::Result<usize>| match r {
        Ok(0) => "closed".to_string(),
        Ok(_) => "none".to_string(),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            "none".to_string()
        }
        Err(e) => format!("{:?}", e.kind()),
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = keepalive.join().ok().flatten();
    held.tcp_error = match written {
        Some(e) => format!("{:?}", e.kind()),
        // Until an error or the end of the wait: a byte out, the echoes back (what is
        // buffered is no error).
        None => {
            tcp.set_read_timeout(Some(Duration::from_millis(100)))?;
            let deadline = Instant::now() + wait;
            loop {
                if let Err(e) = tcp.write_all(b".") {
                    break format!("{:?}", e.kind());
                }
                match describe(tcp.read(&mut buf)) {
                    none if none == "none" && Instant::now() < deadline => {}
                    other => break other,
                }
            }
        }
    };
    held.udp_error = describe(udp.recv(&mut buf));
    direct_sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    held.direct_error = describe(direct_sock.recv(&mut buf));
    held.direct_after = udp_ask(&direct_sock).unwrap_or_else(|e| format!("error: {e}"));
    writeln!(out, "{}", serde_json::to_string(&held)?)?;
    out.flush()?;
    Ok(())
}
