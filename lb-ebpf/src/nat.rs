//! Packets for the tc programs: parsing an IPv4 TCP or UDP packet, rewriting its
//! addresses and ports with the kernel's checksum helpers (a checksum is never written
//! as 0), and sending it on by a FIB lookup.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::{Addr, PROTO_TCP, PROTO_UDP, as_v4, v4_mapped};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const AF_INET: u8 = 2;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// tc's drop verdict (`TC_ACT_SHOT`).
const SHOT: i32 = 2;
pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_RST: u8 = 0x04;

/// An IPv4 TCP or UDP packet: its tuple as it sits in the packet (addresses and ports in
/// network order, read as they are in memory) and where its L4 header starts.
#[derive(Clone, Copy)]
pub(crate) struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    l4: usize,
}

impl Packet {
    /// The packet's IPv4 TCP or UDP tuple; `None` for anything else (other protocols,
    /// fragments, IPv6 for now), which the programs leave alone.
    #[inline(always)]
    pub(crate) fn parse(ctx: &TcContext) -> Option<Self> {
        let eth_proto: u16 = ctx.load(12).ok()?;
        if u16::from_be(eth_proto) != ETH_P_IP {
            return None;
        }
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
        if u16::from_be(frag) & 0x3fff != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let l4 = ETH_HLEN + ihl;
        let tcp_flags = if proto == PROTO_TCP {
            ctx.load::<u8>(l4 + 13).ok()?
        } else {
            0
        };
        Some(Self {
            saddr: ctx.load(IP_SRC).ok()?,
            daddr: ctx.load(IP_DST).ok()?,
            sport: ctx.load(l4).ok()?,
            dport: ctx.load(l4 + 2).ok()?,
            proto,
            tcp_flags,
            l4,
        })
    }

    pub(crate) fn src(&self) -> (Addr, u16) {
        (
            v4_mapped(self.saddr.to_ne_bytes()),
            u16::from_be(self.sport),
        )
    }

    pub(crate) fn dst(&self) -> (Addr, u16) {
        (
            v4_mapped(self.daddr.to_ne_bytes()),
            u16::from_be(self.dport),
        )
    }

    /// Rewrites source and destination to `src` and `dst` (mapped addresses, host-order
    /// ports), updating the IP and L4 checksums; only what changes is written. `None`
    /// for an address that is not IPv4 or a helper that failed. Not inlined: its stack
    /// frame is its own.
    #[inline(never)]
    pub(crate) fn rewrite(
        &self,
        ctx: &TcContext,
        src: (Addr, u16),
        dst: (Addr, u16),
    ) -> Option<()> {
        let saddr = u32::from_ne_bytes(as_v4(&src.0)?);
        let daddr = u32::from_ne_bytes(as_v4(&dst.0)?);
        let (sport, dport) = (src.1.to_be(), dst.1.to_be());
        let csum = self.l4 + if self.proto == PROTO_TCP { 16 } else { 6 };
        // UDP: a zero checksum means "none" and must stay so.
        let mangled = if self.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
        if saddr != self.saddr {
            ctx.l4_csum_replace(csum, self.saddr.into(), saddr.into(), pseudo)
                .ok()?;
            ctx.l3_csum_replace(IP_CSUM, self.saddr.into(), saddr.into(), 4)
                .ok()?;
            ctx.store(IP_SRC, &saddr, 0).ok()?;
        }
        if daddr != self.daddr {
            ctx.l4_csum_replace(csum, self.daddr.into(), daddr.into(), pseudo)
                .ok()?;
            ctx.l3_csum_replace(IP_CSUM, self.daddr.into(), daddr.into(), 4)
                .ok()?;
            ctx.store(IP_DST, &daddr, 0).ok()?;
        }
        if sport != self.sport {
            ctx.l4_csum_replace(csum, self.sport.into(), sport.into(), mangled | 2)
                .ok()?;
            ctx.store(self.l4, &sport, 0).ok()?;
        }
        if dport != self.dport {
            ctx.l4_csum_replace(csum, self.dport.into(), dport.into(), mangled | 2)
                .ok()?;
            ctx.store(self.l4 + 2, &dport, 0).ok()?;
        }
        Some(())
    }
}

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// An ICMP error about a TCP or UDP packet: where its parts are, and the tuple of the
/// packet it quotes (the inner packet, which went the other way).
#[derive(Clone, Copy)]
pub(crate) struct IcmpError {
    /// The quoted packet's tuple, as in [`Packet`].
    pub inner: Packet,
    /// Offsets of the ICMP header and the quoted IP header.
    icmp: usize,
    inner_ip: usize,
    saddr: u32,
    daddr: u32,
}

/// Which outer address an ICMP error's translation changes.
#[derive(Clone, Copy)]
pub(crate) enum Outer {
    /// The destination becomes the quoted packet's (new) source: the client.
    ToClient,
    /// The source becomes the quoted packet's (new) destination: the frontend.
    FromFrontend,
}

impl IcmpError {
    /// An IPv4 ICMP destination-unreachable, time-exceeded or parameter-problem message
    /// quoting a TCP or UDP packet; `None` for anything else.
    #[inline(always)]
    pub(crate) fn parse(ctx: &TcContext) -> Option<Self> {
        let eth_proto: u16 = ctx.load(12).ok()?;
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if u16::from_be(eth_proto) != ETH_P_IP || vihl >> 4 != 4 || proto != IPPROTO_ICMP {
            return None;
        }
        let icmp = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
        let kind: u8 = ctx.load(icmp).ok()?;
        if !matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        ) {
            return None;
        }
        let inner_ip = icmp + 8;
        let inner_vihl: u8 = ctx.load(inner_ip).ok()?;
        let inner_proto: u8 = ctx.load(inner_ip + 9).ok()?;
        if inner_vihl >> 4 != 4 || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP) {
            return None;
        }
        let l4 = inner_ip + usize::from(inner_vihl & 0x0f) * 4;
        Some(Self {
            inner: Packet {
                saddr: ctx.load(inner_ip + 12).ok()?,
                daddr: ctx.load(inner_ip + 16).ok()?,
                sport: ctx.load(l4).ok()?,
                dport: ctx.load(l4 + 2).ok()?,
                proto: inner_proto,
                tcp_flags: 0,
                l4,
            },
            icmp,
            inner_ip,
            saddr: ctx.load(IP_SRC).ok()?,
            daddr: ctx.load(IP_DST).ok()?,
        })
    }

    /// Makes the message about the packet `src` -> `dst` (mapped addresses, host-order
    /// ports): the quoted header is rewritten, with its IP checksum and the ICMP
    /// checksum, then the outer address `outer` says. Not inlined.
    #[inline(never)]
    pub(crate) fn rewrite(
        &self,
        ctx: &TcContext,
        src: (Addr, u16),
        dst: (Addr, u16),
        outer: Outer,
    ) -> Option<()> {
        let saddr = u32::from_ne_bytes(as_v4(&src.0)?);
        let daddr = u32::from_ne_bytes(as_v4(&dst.0)?);
        let (sport, dport) = (src.1.to_be(), dst.1.to_be());
        let icmp_csum = self.icmp + 2;
        let inner_csum = self.inner_ip + 10;
        let old_ip_csum: u16 = ctx.load(inner_csum).ok()?;
        let inner = &self.inner;
        for (off, old, new) in [
            (self.inner_ip + 12, inner.saddr, saddr),
            (self.inner_ip + 16, inner.daddr, daddr),
        ] {
            if old != new {
                ctx.l3_csum_replace(inner_csum, old.into(), new.into(), 4)
                    .ok()?;
                ctx.l4_csum_replace(icmp_csum, old.into(), new.into(), 4)
                    .ok()?;
                ctx.store(off, &new, 0).ok()?;
            }
        }
        let new_ip_csum: u16 = ctx.load(inner_csum).ok()?;
        ctx.l4_csum_replace(icmp_csum, old_ip_csum.into(), new_ip_csum.into(), 2)
            .ok()?;
        for (off, old, new) in [
            (inner.l4, inner.sport, sport),
            (inner.l4 + 2, inner.dport, dport),
        ] {
            if old != new {
                ctx.l4_csum_replace(icmp_csum, old.into(), new.into(), 2)
                    .ok()?;
                ctx.store(off, &new, 0).ok()?;
            }
        }
        let (off, old, new) = match outer {
            Outer::ToClient => (IP_DST, self.daddr, saddr),
            Outer::FromFrontend => (IP_SRC, self.saddr, daddr),
        };
        if old != new {
            ctx.l3_csum_replace(IP_CSUM, old.into(), new.into(), 4)
                .ok()?;
            ctx.store(off, &new, 0).ok()?;
        }
        Some(())
    }
}

/// Sends a (rewritten) packet straight to where the FIB routes its destination, with
/// the neighbour's address; the stack's forwarding is skipped (it would drop a packet
/// whose source is the node's own address as a martian). Returns the tc verdict. Not
/// inlined: its stack frame is its own.
#[inline(never)]
pub(crate) fn forward(ctx: &TcContext, ifindex: u32) -> i32 {
    // SAFETY: a plain C struct; all zero is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = ifindex;
    let (Ok(saddr), Ok(daddr)) = (ctx.load::<u32>(IP_SRC), ctx.load::<u32>(IP_DST)) else {
        return SHOT;
    };
    // No tot_len: the kernel then checks the packet against the output device's MTU
    // itself, GSO-aware (with tot_len, a 64 KB GSO packet "needs fragmentation").
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: the helper reads and writes `fib`, whose size is passed.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
                return SHOT;
            }
            // SAFETY: a helper with plain integers.
            unsafe { bpf_redirect(fib.ifindex, 0) as i32 }
        }
        // SAFETY: a helper with plain integers and no parameters struct.
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe {
            bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        _ => SHOT,
    }
}
