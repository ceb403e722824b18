//! The packet-rate benchmark's UDP generator: datagrams as fast as one thread can send
//! them, in `sendmmsg` batches, for a fixed time (and at most a fixed count). Either over
//! FLOWS connected UDP sockets (one flow each, from the namespace's own address), or, with
//! a source network, over a raw socket with every datagram from a random address of that
//! network (a flood from spoofed sources, which no source range admits).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Datagrams per `sendmmsg` call.
pub const BATCH: usize = 32;
/// The longest run and the most datagrams one run may send.
pub const MAX_DURATION: Duration = Duration::from_secs(60);
pub const MAX_PACKETS: u64 = 1_000_000_000;
/// The highest paced rate, datagrams a second.
pub const MAX_RATE: u64 = 10_000_000;

/// What to send.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// Round-robin: flow (or datagram) `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddrV4>,
    pub duration: Duration,
    pub max_packets: u64,
    /// UDP payload bytes per datagram.
    pub payload: usize,
    /// Connected sockets (flows); ignored with `source_net`.
    pub flows: usize,
    /// Spoofed sources from this network ("a.b.c.d/len"), over a raw socket.
    pub source_net: Option<String>,
    /// Run on this CPU only.
    pub cpu: Option<usize>,
    /// At most this many datagrams a second (none: as fast as the thread goes), paced
    /// batch by batch: a check that the path forwards, not how much.
    pub rate: Option<u64>,
}

/// What was sent: datagrams the kernel took, failed `sendmmsg` calls, the time it took,
/// and the process's CPU time (user and system; what the kernel did on the way out of
/// its sends too, softirq included where the kernel's tick accounting puts it there).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FloodReport {
    pub sent: u64,
    pub errors: u64,
    pub elapsed_ns: u64,
    #[serde(default)]
    pub cpu_ns: u64,
}

impl FloodReport {
    /// Datagrams sent per second.
    pub fn rate(&self) -> f64 {
        if self.elapsed_ns == 0 {
            return 0.0;
        }
        self.sent as f64 * 1e9 / self.elapsed_ns as f64
    }
}

impl FloodSpec {
    /// The spec's bounds, each refused with the flag it came from.
    fn check(&self) -> anyhow::Result<()> {
        if self.targets.is_empty() {
            bail!("udp-flood: no --target");
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            bail!(
                "udp-flood --duration-ms {}: 1 to {}",
                self.duration.as_millis(),
                MAX_DURATION.as_millis()
            );
        }
        if self.max_packets == 0 || self.max_packets > MAX_PACKETS {
            bail!(
                "udp-flood --max-packets {}: 1 to {MAX_PACKETS}",
                self.max_packets
            );
        }
        if self.payload > 1400 {
            bail!("udp-flood --payload {}: at most 1400 bytes", self.payload);
        }
        if !(1..=4096).contains(&self.flows) {
            bail!("udp-flood --flows {}: 1 to 4096", self.flows);
        }
        if let Some(rate) = self.rate.filter(|r| !(1..=MAX_RATE).contains(r)) {
            bail!("udp-flood --rate {rate}: 1 to {MAX_RATE} a second");
        }
        Ok(())
    }
}

/// Sends as `spec` says; returns what was sent.
pub fn udp_flood(spec: &FloodSpec) -> anyhow::Result<FloodReport> {
    spec.check()?;
    if let Some(cpu) = spec.cpu {
        crate::lab::set_affinity(std::process::id(), Some(cpu))?;
    }
    let mut report = match &spec.source_net {
        Some(net) => spoofed(spec, net),
        None => connected(spec),
    }?;
    report.cpu_ns = own_cpu_ns();
    Ok(report)
}

/// This process's user and system CPU time so far, in ns.
fn own_cpu_ns() -> u64 {
    // SAFETY: getrusage(2) fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above, a live struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(u.ru_utime) + ns(u.ru_stime)
}

/// The send loop: `send(k, want)` sends up to `want` datagrams (the k-th call) and returns
/// how many went, or an error; runs until the time or the count is reached. With a rate,
/// each batch waits for its moment (the datagrams sent so far over the rate).
fn send_loop(
    spec: &FloodSpec,
    mut send: impl FnMut(usize, usize) -> std::io::Result<usize>,
) -> FloodReport {
    let mut report = FloodReport::default();
    let start = Instant::now();
    let mut k = 0;
    while report.sent < spec.max_packets && start.elapsed() < spec.duration {
        if let Some(rate) = spec.rate {
            let due = start + Duration::from_nanos(report.sent * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep((due - now).min(spec.duration.saturating_sub(now - start)));
                continue;
            }
        }
        let want = BATCH.min((spec.max_packets - report.sent) as usize);
        match send(k, want) {
            Ok(n) => report.sent += n as u64,
            // A refused or unreachable destination: counted, and the loop goes on (it
            // is bounded by the time).
            Err(_) => report.errors += 1,
        }
        k += 1;
    }
    report.elapsed_ns = start.elapsed().as_nanos() as u64;
    report
}

/// `mmsghdr`s over `iovs`, one each, to `names` (none: connected sockets).
fn headers(
    iovs: &mut [libc::iovec],
    names: Option<&mut [libc::sockaddr_in]>,
) -> Vec<libc::mmsghdr> {
    let names = names.map(|n| n.as_mut_ptr());
    iovs.iter_mut()
        .enumerate()
        .map(|(i, iov)| {
            // SAFETY: msghdr is plain data; zero is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(base) = names {
                // SAFETY: `names` has one address per iovec (the callers' arrays).
                h.msg_hdr.msg_name = unsafe { base.add(i) }.cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            }
            h
        })
        .collect()
}

fn sendmmsg(fd: i32, msgs: &mut [libc::mmsghdr], want: usize) -> std::io::Result<usize> {
    // SAFETY: every header points at buffers (and addresses) alive for the call.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), want as u32, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// FLOWS connected UDP sockets, each sending a batch in turn.
fn connected(spec: &FloodSpec) -> anyhow::Result<FloodReport> {
    let mut sockets = Vec::with_capacity(spec.flows);
    for i in 0..spec.flows {
        let target = spec.targets[i % spec.targets.len()];
        let s = UdpSocket::bind("0.0.0.0:0").context("udp-flood: binding a UDP socket")?;
        s.connect(target)
            .with_context(|| format!("udp-flood: connecting a UDP socket to {target}"))?;
        sockets.push(s);
    }
    let mut payload = vec![0x5au8; spec.payload];
    let mut iovs = vec![
        libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        BATCH
    ];
    let mut msgs = headers(&mut iovs, None);
    Ok(send_loop(spec, |k, want| {
        sendmmsg(sockets[k % sockets.len()].as_raw_fd(), &mut msgs, want)
    }))
}

/// An IPv4 UDP datagram from `src:sport` to `dst` with `payload` bytes: header checksum
/// filled, UDP checksum 0 (none, as IPv4 allows).
pub fn udp_packet(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, payload: usize) -> Vec<u8> {
    let len = 28 + payload;
    let mut p = vec![0x5au8; len];
    p[..28].fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    set_ip_checksum(&mut p);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    p
}

/// Gives packet `p` source `src:sport` and the IPv4 header checksum that goes with it.
fn set_source(p: &mut [u8], src: Ipv4Addr, sport: u16) {
    p[12..16].copy_from_slice(&src.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    set_ip_checksum(p);
}

fn set_ip_checksum(p: &mut [u8]) {
    p[10..12].fill(0);
    let sum = crate::flood::fold(crate::flood::sum(0, &p[..20]));
    p[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Datagrams from random addresses (and ports) of `net` over a raw socket, round-robin
/// over the targets; each batch gets new sources.
fn spoofed(spec: &FloodSpec, net: &str) -> anyhow::Result<FloodReport> {
    let (base, host_mask) =
        crate::flood::parse_net(net).with_context(|| format!("udp-flood --source-net {net:?}"))?;
    // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("udp-flood: a raw socket (needs CAP_NET_RAW)");
    }
    // SAFETY: a descriptor just opened, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let targets: Vec<SocketAddrV4> = (0..BATCH)
        .map(|i| spec.targets[i % spec.targets.len()])
        .collect();
    let mut packets: Vec<Vec<u8>> = targets
        .iter()
        .map(|t| udp_packet(Ipv4Addr::UNSPECIFIED, 0, *t, spec.payload))
        .collect();
    let mut names: Vec<libc::sockaddr_in> = targets
        .iter()
        .map(|t| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*t.ip()).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iovs: Vec<libc::iovec> = packets
        .iter_mut()
        .map(|p| libc::iovec {
            iov_base: p.as_mut_ptr().cast(),
            iov_len: p.len(),
        })
        .collect();
    let mut msgs = headers(&mut iovs, Some(&mut names));
    let mut rng = crate::flood::XorShift::seeded();
    Ok(send_loop(spec, |_, want| {
        for h in &msgs[..want] {
            let r = rng.next();
            let src = Ipv4Addr::from(base | (r as u32 & host_mask));
            let sport = 1024 + ((r >> 32) as u16 % 60_000);
            // SAFETY: each header's one iovec is a packet of `packets`, alive and not
            // otherwise borrowed while the loop runs.
            let p = unsafe {
                let iov = &*h.msg_hdr.msg_iov;
                std::slice::from_raw_parts_mut(iov.iov_base.cast::<u8>(), iov.iov_len)
            };
            set_source(p, src, sport);
        }
        sendmmsg(fd.as_raw_fd(), &mut msgs, want)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FloodSpec {
        FloodSpec {
            targets: vec!["192.168.77.11:30999".parse().unwrap()],
            duration: Duration::from_millis(50),
            max_packets: 100,
            payload: 18,
            flows: 4,
            source_net: None,
            cpu: None,
            rate: None,
        }
    }

    #[test]
    fn a_spoofed_datagram_has_a_valid_header_and_no_udp_checksum() {
        let dst: SocketAddrV4 = "10.200.0.1:9999".parse().unwrap();
        let mut p = udp_packet(Ipv4Addr::UNSPECIFIED, 0, dst, 18);
        set_source(&mut p, Ipv4Addr::new(198, 18, 7, 9), 40_000);
        assert_eq!(p.len(), 46);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 46, "total length");
        assert_eq!(p[9], 17, "UDP");
        assert_eq!(&p[12..16], &[198, 18, 7, 9]);
        assert_eq!(&p[16..20], &[10, 200, 0, 1]);
        // A header with its checksum folds to 0.
        assert_eq!(crate::flood::fold(crate::flood::sum(0, &p[..20])), 0);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 40_000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 9999);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 26, "UDP length");
        assert_eq!(&p[26..28], &[0, 0], "no UDP checksum");
        assert!(p[28..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn the_loop_stops_at_the_count_and_counts_failed_calls() {
        let mut calls = 0;
        let r = send_loop(&spec(), |k, want| {
            calls += 1;
            if k % 2 == 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
            }
            Ok(want)
        });
        // 32 + 32 + 32 + 4, with a failed call between each.
        assert_eq!((r.sent, r.errors, calls), (100, 3, 7));
        assert!(r.rate() > 0.0);
    }

    #[test]
    fn a_paced_loop_sends_no_faster_than_its_rate() {
        // 2,000 a second for 50 ms: about 100, in batches of 32 (a batch over, and slack
        // for a late wake-up).
        let paced = FloodSpec {
            rate: Some(2_000),
            max_packets: 10_000,
            ..spec()
        };
        let r = send_loop(&paced, |_, want| Ok(want));
        assert!(r.elapsed_ns >= 50_000_000);
        assert!((96..=160).contains(&r.sent), "sent {}", r.sent);
        let unpaced = FloodSpec {
            max_packets: 10_000,
            ..spec()
        };
        assert_eq!(send_loop(&unpaced, |_, want| Ok(want)).sent, 10_000);
    }

    #[test]
    fn the_loop_stops_at_the_time_when_nothing_goes() {
        let r = send_loop(&spec(), |_, _| Ok(0));
        assert_eq!(r.sent, 0);
        assert!(r.elapsed_ns >= 50_000_000);
        assert_eq!(r.rate(), 0.0);
    }

    #[test]
    fn out_of_bounds_specs_name_their_flag() {
        let e = |s: FloodSpec| s.check().unwrap_err().to_string();
        assert!(e(FloodSpec { flows: 0, ..spec() }).contains("--flows 0"));
        let long = FloodSpec {
            duration: Duration::from_secs(61),
            ..spec()
        };
        assert!(e(long).contains("--duration-ms 61000"));
        assert!(
            e(FloodSpec {
                max_packets: 0,
                ..spec()
            })
            .contains("--max-packets 0")
        );
        assert!(
            e(FloodSpec {
                payload: 9000,
                ..spec()
            })
            .contains("--payload 9000")
        );
        assert!(
            e(FloodSpec {
                targets: vec![],
                ..spec()
            })
            .contains("no --target")
        );
        assert!(
            e(FloodSpec {
                rate: Some(0),
                ..spec()
            })
            .contains("--rate 0")
        );
        assert!(spec().check().is_ok());
    }
}
