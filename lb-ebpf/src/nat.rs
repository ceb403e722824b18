//! Packets for the packet level, whatever the hook ([`Ctx`]): parsing an IPv4 or IPv6
//! TCP or UDP packet (and ICMP errors about one), rewriting its addresses and ports with
//! incremental checksum updates (a checksum is never written as 0), and sending it on by
//! a FIB lookup.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_check_mtu_ret::{BPF_MTU_CHK_RET_FRAG_NEEDED, BPF_MTU_CHK_RET_SEGS_TOOBIG},
        bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_ktime_get_ns},
};
use lb_common::{
    Addr, CT_EV_FRAG_UNKNOWN, CT_EV_FRAG6_PASSED, CtValue, FRAG_TIMEOUT_S, FragKey, FragValue,
    PROTO_TCP, PROTO_UDP, as_v4, is_v4_mapped, v4_mapped,
};

use crate::{
    ctx::Ctx,
    maps::{LB_FRAGS_V1, ct_event},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IPv4 flags and fragment offset.
const IP_FRAG: usize = ETH_HLEN + 6;
const IP_DF: u16 = 0x4000;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
const IP_ID: usize = ETH_HLEN + 4;
const IP_TTL: usize = ETH_HLEN + 8;
const IP6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IP6_NEXT: usize = ETH_HLEN + 6;
const IPPROTO_FRAGMENT: u8 = 44;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
const IP6_HLEN: usize = 40;

/// Where an IP header's addresses are, by family.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    /// The header's family from the Ethernet type.
    #[inline(always)]
    fn of<C: Ctx>(ctx: &C) -> Option<Self> {
        let eth_proto: u16 = ctx.load(12).ok()?;
        match u16::from_be(eth_proto) {
            ETH_P_IP => Some(Self::V4),
            ETH_P_IPV6 => Some(Self::V6),
            _ => None,
        }
    }
}

/// The source and destination of the IP header at `ip`, as mapped addresses, written
/// to `src` and `dst`.
#[inline(always)]
fn write_addrs<C: Ctx>(
    ctx: &C,
    ip: usize,
    family: Family,
    src: &mut Addr,
    dst: &mut Addr,
) -> Option<()> {
    // Loaded straight into place: no copy on the (small) eBPF stack.
    match family {
        Family::V4 => {
            *src = v4_mapped([0; 4]);
            *dst = v4_mapped([0; 4]);
            load_into(ctx, ip + 12, &mut src[12..], 4)?;
            load_into(ctx, ip + 16, &mut dst[12..], 4)?;
        }
        Family::V6 => {
            load_into(ctx, ip + 8, &mut src[..], 16)?;
            load_into(ctx, ip + 24, &mut dst[..], 16)?;
        }
    }
    Some(())
}

/// `len` bytes of the packet at `off` into `dst` (at least `len` long), with a constant
/// length the verifier can check.
#[inline(always)]
fn load_into<C: Ctx>(ctx: &C, off: usize, dst: &mut [u8], len: u32) -> Option<()> {
    if dst.len() < len as usize {
        return None;
    }
    ctx.load_bytes(off, dst.as_mut_ptr().cast(), len).ok()
}

/// Where and how [`replace_addr`] writes an address.
struct AddrEdit {
    v6: bool,
    /// The address's offset in the packet.
    off: usize,
    /// The checksum the change is folded into, with the helper's flags (pseudo-header,
    /// mangled-0); 0: none (a later fragment carries no L4 header).
    csum: usize,
    flags: u64,
    /// For IPv4: the IP header checksum that covers the address, if any (else 0).
    ip_csum: usize,
}

/// Replaces `old` with `new` as `edit` says (only when they differ). Not inlined: its
/// stack frame is its own.
#[inline(never)]
fn replace_addr<C: Ctx>(ctx: &C, edit: &AddrEdit, old: &Addr, new: &Addr) -> Option<()> {
    if old == new {
        return Some(());
    }
    if !edit.v6 {
        let old = u32::from_ne_bytes(as_v4(old)?);
        let new = u32::from_ne_bytes(as_v4(new)?);
        if edit.csum != 0 {
            ctx.l4_csum_replace(edit.csum, old.into(), new.into(), edit.flags | 4)
                .ok()?;
        }
        if edit.ip_csum != 0 {
            ctx.l3_csum_replace(edit.ip_csum, old.into(), new.into(), 4)
                .ok()?;
        }
        return ctx.store(edit.off, &new, 0).ok();
    }
    // An IPv4 (mapped) address cannot go into an IPv6 header.
    if is_v4_mapped(new) {
        return None;
    }
    for i in 0..4 {
        // SAFETY: in bounds (i < 4 words of 16 bytes); read unaligned.
        let (old_word, new_word) = unsafe {
            (
                old.as_ptr().add(i * 4).cast::<u32>().read_unaligned(),
                new.as_ptr().add(i * 4).cast::<u32>().read_unaligned(),
            )
        };
        ctx.l4_csum_replace(edit.csum, old_word.into(), new_word.into(), edit.flags | 4)
            .ok()?;
    }
    ctx.store(edit.off, new, 0).ok()
}

/// The address at `off` of a `family` header, as a mapped address.
#[inline(always)]
fn addr_at<C: Ctx>(ctx: &C, off: usize, family: Family) -> Option<Addr> {
    match family {
        Family::V4 => Some(v4_mapped(ctx.load::<[u8; 4]>(off).ok()?)),
        Family::V6 => ctx.load(off).ok(),
    }
}

/// A TCP or UDP packet: its tuple (mapped addresses; ports in network order, as in the
/// packet), its family and where its L4 header starts. Kept in a per-CPU scratch map
/// (the eBPF stack is small).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Packet {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// `FRAG_*`: whether the packet is a fragment, and which.
    pub frag: u8,
    /// The IPv4 identification (network order), for fragments.
    pub ip_id: u16,
    l4: usize,
    /// The fragments map's key of the packet's datagram (here: not on the stack).
    fkey: FragKey,
}

/// `bpf_ktime_get_ns()` in seconds, as the fragments map keeps it (wraps after 136 years).
#[inline(always)]
fn now_s() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

/// [`Packet::frag`]: a whole datagram.
pub(crate) const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram: it has the ports.
pub(crate) const FRAG_FIRST: u8 = 1;
/// A later fragment: no L4 header; its ports are its first fragment's.
pub(crate) const FRAG_LATER: u8 = 2;

impl Packet {
    /// The packet's TCP or UDP tuple, written to `out`; `None` for anything else (other
    /// protocols, IPv6 extension headers, a later IPv4 fragment whose first fragment was
    /// not ours), which the programs leave alone. A later fragment's ports are its first
    /// fragment's ([`Packet::remember_ports`]).
    #[inline(always)]
    pub(crate) fn parse_into<C: Ctx>(ctx: &C, out: &mut Self) -> Option<()> {
        let family = Family::of(ctx)?;
        out.frag = FRAG_NONE;
        out.ip_id = 0;
        let (proto, l4) = match family {
            Family::V4 => {
                let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
                let ihl = usize::from(vihl & 0x0f) * 4;
                let frag = u16::from_be(ctx.load::<u16>(IP_FRAG).ok()?);
                if vihl >> 4 != 4 || ihl < 20 {
                    return None;
                }
                if frag & (IP_MF | IP_OFFSET) != 0 {
                    out.frag = if frag & IP_OFFSET == 0 {
                        FRAG_FIRST
                    } else {
                        FRAG_LATER
                    };
                    out.ip_id = ctx.load(IP_ID).ok()?;
                }
                (ctx.load::<u8>(ETH_HLEN + 9).ok()?, ETH_HLEN + ihl)
            }
            Family::V6 => {
                let next = ctx.load::<u8>(IP6_NEXT).ok()?;
                if next == IPPROTO_FRAGMENT {
                    ct_event(CT_EV_FRAG6_PASSED);
                }
                (next, ETH_HLEN + IP6_HLEN)
            }
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        write_addrs(ctx, ETH_HLEN, family, &mut out.saddr, &mut out.daddr)?;
        // An IPv6 packet with IPv4-mapped addresses would share keys with IPv4 flows.
        if family == Family::V6 && (is_v4_mapped(&out.saddr) || is_v4_mapped(&out.daddr)) {
            return None;
        }
        out.proto = proto;
        out.v6 = family == Family::V6;
        out.l4 = l4;
        if out.frag == FRAG_LATER {
            let ports = out.first_fragment_ports()?;
            out.sport = ports.sport;
            out.dport = ports.dport;
            out.tcp_flags = 0;
            return Some(());
        }
        out.tcp_flags = if proto == PROTO_TCP {
            ctx.load::<u8>(l4 + 13).ok()?
        } else {
            0
        };
        out.sport = ctx.load(l4).ok()?;
        out.dport = ctx.load(l4 + 2).ok()?;
        Some(())
    }

    /// The fragments map's key of this packet's datagram, written to `self.fkey`.
    #[inline(always)]
    fn write_frag_key(&mut self) {
        self.fkey.saddr = self.saddr;
        self.fkey.daddr = self.daddr;
        self.fkey.id = self.ip_id;
        self.fkey.proto = self.proto;
        self.fkey._pad = 0;
    }

    /// A later fragment's ports: those its first fragment had, if that was ours.
    #[inline(always)]
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "a copy would cost eBPF stack"
    )]
    fn first_fragment_ports(&mut self) -> Option<FragValue> {
        self.write_frag_key();
        let now = now_s();
        // SAFETY: copied out at once.
        let found = unsafe { LB_FRAGS_V1.get(&self.fkey) }
            .copied()
            .filter(|v| now.wrapping_sub(v.seen_s) <= FRAG_TIMEOUT_S);
        if found.is_none() {
            ct_event(CT_EV_FRAG_UNKNOWN);
        }
        found
    }

    /// Remembers a first fragment's ports for the datagram's later fragments (the packet
    /// is ours: a tracked flow's). Not inlined: its stack frame is its own.
    #[inline(never)]
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "a copy would cost eBPF stack"
    )]
    pub(crate) fn remember_ports(&mut self) {
        if self.frag != FRAG_FIRST {
            return;
        }
        self.write_frag_key();
        let ports = FragValue {
            sport: self.sport,
            dport: self.dport,
            seen_s: now_s(),
        };
        let _ = LB_FRAGS_V1.insert(&self.fkey, &ports, 0);
    }

    pub(crate) fn family(&self) -> Family {
        if self.v6 { Family::V6 } else { Family::V4 }
    }

    /// Rewrites source and destination to those of `to` (the tuple a tracked flow's
    /// packet becomes), updating the IP (IPv4) and L4 checksums; only what changes is
    /// written. `None` for an address of the other family or a helper that failed. Not
    /// inlined: its stack frame is its own.
    #[inline(never)]
    pub(crate) fn rewrite<C: Ctx>(&self, ctx: &C, to: &CtValue) -> Option<()> {
        let (sport, dport) = (to.sport.to_be(), to.dport.to_be());
        // A later fragment has no L4 header: its addresses change, and only the IP
        // header's checksum with them (the first fragment carried the L4 checksum's).
        let later = self.frag == FRAG_LATER;
        let csum = if later {
            0
        } else {
            self.l4 + if self.proto == PROTO_TCP { 16 } else { 6 }
        };
        // UDP over IPv4: a zero checksum means "none" and must stay so.
        let mangled = if self.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let v6 = self.v6;
        let (src_off, dst_off, ip_csum) = if v6 {
            (IP6_SRC, IP6_DST, 0)
        } else {
            (IP_SRC, IP_DST, IP_CSUM)
        };
        let mut edit = AddrEdit {
            v6,
            off: src_off,
            csum,
            flags: u64::from(BPF_F_PSEUDO_HDR) | mangled,
            ip_csum,
        };
        replace_addr(ctx, &edit, &self.saddr, &to.saddr)?;
        edit.off = dst_off;
        replace_addr(ctx, &edit, &self.daddr, &to.daddr)?;
        if later {
            return Some(());
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
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

/// An ICMP (or ICMPv6) error about a TCP or UDP packet: where its parts are. The tuple
/// of the packet it quotes (which went the other way) is parsed into a [`Packet`].
#[derive(Clone, Copy)]
pub(crate) struct IcmpError {
    /// Offsets of the ICMP header and the quoted IP header.
    icmp: usize,
    inner_ip: usize,
}

/// Which outer address an ICMP error's translation changes.
#[derive(Clone, Copy)]
pub(crate) enum Outer {
    /// The destination becomes the quoted packet's (new) source: whoever sent it.
    ToSender,
    /// The source becomes the quoted packet's (new) destination: the frontend.
    FromFrontend,
}

impl IcmpError {
    /// An ICMP destination-unreachable, time-exceeded or parameter-problem message (and
    /// ICMPv6's packet-too-big) quoting a TCP or UDP packet, whose tuple goes to `inner`;
    /// `None` for anything else.
    #[inline(always)]
    pub(crate) fn parse<C: Ctx>(ctx: &C, inner: &mut Packet) -> Option<Self> {
        let family = Family::of(ctx)?;
        let icmp = match family {
            Family::V4 => {
                let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
                let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
                if vihl >> 4 != 4 || proto != IPPROTO_ICMP {
                    return None;
                }
                ETH_HLEN + usize::from(vihl & 0x0f) * 4
            }
            Family::V6 => {
                if ctx.load::<u8>(IP6_NEXT).ok()? != IPPROTO_ICMPV6 {
                    return None;
                }
                ETH_HLEN + IP6_HLEN
            }
        };
        let kind: u8 = ctx.load(icmp).ok()?;
        let error = match family {
            Family::V4 => matches!(
                kind,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
            ),
            Family::V6 => matches!(
                kind,
                ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
            ),
        };
        if !error {
            return None;
        }
        let inner_ip = icmp + 8;
        let (inner_proto, l4) = match family {
            Family::V4 => {
                let vihl: u8 = ctx.load(inner_ip).ok()?;
                if vihl >> 4 != 4 || vihl & 0x0f < 5 {
                    return None;
                }
                (
                    ctx.load::<u8>(inner_ip + 9).ok()?,
                    inner_ip + usize::from(vihl & 0x0f) * 4,
                )
            }
            Family::V6 => (ctx.load::<u8>(inner_ip + 6).ok()?, inner_ip + IP6_HLEN),
        };
        if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
            return None;
        }
        write_addrs(ctx, inner_ip, family, &mut inner.saddr, &mut inner.daddr)?;
        inner.sport = ctx.load(l4).ok()?;
        inner.dport = ctx.load(l4 + 2).ok()?;
        inner.proto = inner_proto;
        inner.tcp_flags = 0;
        inner.v6 = family == Family::V6;
        inner.frag = FRAG_NONE;
        inner.ip_id = 0;
        inner.l4 = l4;
        Some(Self { icmp, inner_ip })
    }

    /// Makes the message about the packet that the reply entry `v` answers, instead of
    /// `inner` (what [`IcmpError::parse`] read): the quoted packet becomes `v`'s
    /// destination -> `v`'s source (the client -> the frontend); the quoted header is
    /// rewritten, with its IP checksum (IPv4) and the ICMP checksum, then the outer
    /// address `outer` says. Not inlined.
    #[inline(never)]
    pub(crate) fn rewrite<C: Ctx>(
        &self,
        ctx: &C,
        inner: &Packet,
        v: &CtValue,
        outer: Outer,
    ) -> Option<()> {
        // The quoted packet becomes v's destination -> v's source.
        let family = inner.family();
        let icmp_csum = self.icmp + 2;
        let (inner_csum, src_off, dst_off) = match family {
            Family::V4 => (self.inner_ip + 10, self.inner_ip + 12, self.inner_ip + 16),
            Family::V6 => (0, self.inner_ip + 8, self.inner_ip + 24),
        };
        let old_ip_csum: u16 = if inner_csum != 0 {
            ctx.load(inner_csum).ok()?
        } else {
            0
        };
        // The quoted header is ICMP payload: its changes enter the ICMP checksum plainly.
        let mut edit = AddrEdit {
            v6: inner.v6,
            off: src_off,
            csum: icmp_csum,
            flags: 0,
            ip_csum: inner_csum,
        };
        replace_addr(ctx, &edit, &inner.saddr, &v.daddr)?;
        edit.off = dst_off;
        replace_addr(ctx, &edit, &inner.daddr, &v.saddr)?;
        if inner_csum != 0 {
            let new_ip_csum: u16 = ctx.load(inner_csum).ok()?;
            ctx.l4_csum_replace(icmp_csum, old_ip_csum.into(), new_ip_csum.into(), 2)
                .ok()?;
        }
        let (sport, dport) = (v.dport.to_be(), v.sport.to_be());
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
        // The outer header: ICMPv6's checksum covers a pseudo-header; ICMP's does not,
        // only the IPv4 header checksum covers an IPv4 outer address.
        let (off, new) = match (outer, family) {
            (Outer::ToSender, Family::V4) => (IP_DST, &v.daddr),
            (Outer::ToSender, Family::V6) => (IP6_DST, &v.daddr),
            (Outer::FromFrontend, Family::V4) => (IP_SRC, &v.saddr),
            (Outer::FromFrontend, Family::V6) => (IP6_SRC, &v.saddr),
        };
        let old = addr_at(ctx, off, family)?;
        if family == Family::V4 {
            let old4 = u32::from_ne_bytes(as_v4(&old)?);
            let new4 = u32::from_ne_bytes(as_v4(new)?);
            if old4 != new4 {
                ctx.l3_csum_replace(IP_CSUM, old4.into(), new4.into(), 4)
                    .ok()?;
                ctx.store(off, &new4, 0).ok()?;
            }
            return Some(());
        }
        let edit = AddrEdit {
            v6: true,
            off,
            csum: icmp_csum,
            flags: u64::from(BPF_F_PSEUDO_HDR),
            ip_csum: 0,
        };
        replace_addr(ctx, &edit, &old, new)
    }
}

/// The interface the FIB routes `dst` out of (looked up as if it arrived on `ifindex`);
/// `ifindex` itself when the lookup fails. Not inlined: its frame (the lookup's
/// parameters) is its own.
#[inline(never)]
pub(crate) fn route_ifindex<C: Ctx>(ctx: &C, ifindex: u32, dst: &Addr) -> u32 {
    // SAFETY: a plain C struct; all zero is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.ifindex = ifindex;
    match as_v4(dst) {
        Some(v4) => {
            fib.family = AF_INET;
            fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(v4);
        }
        None => {
            fib.family = AF_INET6;
            // SAFETY: 16 bytes into the union's 16-byte IPv6 member.
            unsafe {
                fib.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<Addr, [u32; 4]>(*dst);
            }
        }
    }
    // SAFETY: the helper reads and writes `fib`, whose size is passed. (No
    // BPF_FIB_LOOKUP_SKIP_NEIGH, 6.3+: the output interface is set before the neighbour
    // check, so NO_NEIGH has it too.)
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => fib.ifindex,
        _ => ifindex,
    }
}

/// Sends a (rewritten) packet straight to where the FIB routes its destination, with
/// the neighbour's address; the stack's forwarding is skipped (it would drop a packet
/// whose source is the node's own address as a martian). Returns the hook's verdict. Not
/// inlined: its stack frame is its own.
#[inline(never)]
pub(crate) fn forward<C: Ctx>(ctx: &C, ifindex: u32, family: Family, mtu: &mut u16) -> i32 {
    // SAFETY: a plain C struct; all zero is a valid value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.ifindex = ifindex;
    // No tot_len: the kernel then checks the packet against the output device's MTU
    // itself, GSO-aware (with tot_len, a 64 KB GSO packet "needs fragmentation").
    let loaded = match family {
        Family::V4 => {
            fib.family = AF_INET;
            match (ctx.load::<u32>(IP_SRC), ctx.load::<u32>(IP_DST)) {
                (Ok(src), Ok(dst)) => {
                    fib.__bindgen_anon_3.ipv4_src = src;
                    fib.__bindgen_anon_4.ipv4_dst = dst;
                    true
                }
                _ => false,
            }
        }
        Family::V6 => {
            fib.family = AF_INET6;
            match (ctx.load::<[u32; 4]>(IP6_SRC), ctx.load::<[u32; 4]>(IP6_DST)) {
                (Ok(src), Ok(dst)) => {
                    fib.__bindgen_anon_3.ipv6_src = src;
                    fib.__bindgen_anon_4.ipv6_dst = dst;
                    true
                }
                _ => false,
            }
        }
    };
    if !loaded {
        return C::DROP;
    }
    // SAFETY: the helper reads and writes `fib`, whose size is passed.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let ret = ret as u32;
    if ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The FIB lets a GSO packet (GRO merged on the way in) through whatever its
        // segments' size: check those against the output device, as forwarding does.
        let mut mtu_len: u32 = 0;
        // SAFETY: the context's sk_buff and a u32 the helper writes.
        let chk =
            unsafe { bpf_check_mtu(ctx.as_ptr(), fib.ifindex, &mut mtu_len, 0, C::MTU_FLAGS) };
        if chk == i64::from(BPF_MTU_CHK_RET_SEGS_TOOBIG)
            || chk == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED)
        {
            *mtu = mtu_len.min(u32::from(u16::MAX)) as u16;
            return TOO_BIG;
        }
    }
    match ret {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if !ctx.sends_by(fib.ifindex) {
                return HAND_ON;
            }
            if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
                return C::DROP;
            }
            ctx.redirect(fib.ifindex)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH if C::HAS_NEIGH => ctx.redirect_neigh(fib.ifindex),
        // Nothing here resolves the next hop's address: a hook that can does.
        BPF_FIB_LKUP_RET_NO_NEIGH => HAND_ON,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the helper set the union's mtu_result member for this answer.
            *mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
            TOO_BIG
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => LOCAL,
        _ => C::DROP,
    }
}

/// Takes one hop off the packet's TTL (IPv4, with the header checksum) or hop limit
/// (IPv6), as forwarding does; `false` (nothing changed) when it has none to give: the
/// packet must not be forwarded. Not inlined: its stack frame is its own.
#[inline(never)]
pub(crate) fn hop<C: Ctx>(ctx: &C, v6: bool) -> bool {
    if v6 {
        return match ctx.load::<u8>(IP6_HOP_LIMIT) {
            Ok(hl) if hl > 1 => ctx.store(IP6_HOP_LIMIT, &(hl - 1), 0).is_ok(),
            _ => false,
        };
    }
    // The TTL shares a 16-bit word of the checksum with the protocol.
    let Ok(word) = ctx.load::<[u8; 2]>(IP_TTL) else {
        return false;
    };
    if word[0] <= 1 {
        return false;
    }
    let new = [word[0] - 1, word[1]];
    let (old16, new16) = (u16::from_ne_bytes(word), u16::from_ne_bytes(new));
    ctx.l3_csum_replace(IP_CSUM, old16.into(), new16.into(), 2)
        .is_ok()
        && ctx.store(IP_TTL, &new, 0).is_ok()
}

/// Gives back the hop [`hop`] took (the packet is handed on instead of forwarded);
/// `false` when that failed.
#[inline(never)]
pub(crate) fn unhop<C: Ctx>(ctx: &C, v6: bool) -> bool {
    if v6 {
        return match ctx.load::<u8>(IP6_HOP_LIMIT) {
            Ok(hl) if hl < u8::MAX => ctx.store(IP6_HOP_LIMIT, &(hl + 1), 0).is_ok(),
            _ => false,
        };
    }
    let Ok(word) = ctx.load::<[u8; 2]>(IP_TTL) else {
        return false;
    };
    if word[0] == u8::MAX {
        return false;
    }
    let new = [word[0] + 1, word[1]];
    let (old16, new16) = (u16::from_ne_bytes(word), u16::from_ne_bytes(new));
    ctx.l3_csum_replace(IP_CSUM, old16.into(), new16.into(), 2)
        .is_ok()
        && ctx.store(IP_TTL, &new, 0).is_ok()
}

/// Swaps the tuple a packet was rewritten from (`p`) with the one it was rewritten to
/// (`v`): rewriting the packet to `v` after the swap undoes the first rewrite, and `v`
/// then holds the tuple as it arrived. In place: no copy on the eBPF stack.
#[inline(always)]
pub(crate) fn swap_tuple(p: &mut Packet, v: &mut CtValue) {
    core::mem::swap(&mut p.saddr, &mut v.saddr);
    core::mem::swap(&mut p.daddr, &mut v.daddr);
    let (sport, dport) = (p.sport, p.dport);
    p.sport = v.sport.to_be();
    p.dport = v.dport.to_be();
    v.sport = u16::from_be(sport);
    v.dport = u16::from_be(dport);
}

/// `bytes` (16-bit words, network order) added to the unfolded Internet checksum `sum`.
#[inline(always)]
fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Whether the IPv4 packet in `ctx` has Don't Fragment set (a sender doing path-MTU
/// discovery, which a fragmentation-needed is for).
#[inline(always)]
pub(crate) fn dont_fragment<C: Ctx>(ctx: &C) -> bool {
    ctx.load::<u16>(IP_FRAG)
        .is_ok_and(|f| u16::from_be(f) & IP_DF != 0)
}

/// How much of the packet an ICMP error made here quotes: the IP header and 20 bytes
/// (a TCP header's checksum field stays inside, which the kernel's trim of a partially
/// checksummed packet requires).
const QUOTE: usize = 40;

/// The size of an ICMP error made here: IP and ICMP headers, and the quote.
pub(crate) const ICMP_REPLY_LEN: usize = 28 + QUOTE;

/// ICMP fragmentation-needed (type 3, code 4) with next-hop MTU `mtu`.
pub(crate) const fn frag_needed_msg(mtu: u16) -> u32 {
    (ICMP_DEST_UNREACH as u32) << 24 | 4 << 16 | mtu as u32
}

/// ICMP time exceeded in transit (type 11, code 0).
pub(crate) const TIME_EXCEEDED_MSG: u32 = (ICMP_TIME_EXCEEDED as u32) << 24;

/// An ICMP error `msg` (type << 24 | code << 16 | the low 16 bits of the rest of the
/// header, the next-hop MTU of a fragmentation-needed) about the IPv4 packet in `ctx`,
/// whose tuple as it arrived is in `s.value` ([`swap_tuple`]): made of the packet itself,
/// cut to what is quoted, an IP and an ICMP header put in front (built in `s.icmp`), from
/// the address the client asked to the client, MAC addresses swapped, and sent back out
/// of `ifindex`. `None` (the caller drops) for IPv6 and IP options. Not inlined: its
/// stack frame is its own.
#[inline(never)]
pub(crate) fn icmp_reply<C: Ctx>(
    ctx: &C,
    s: &mut crate::maps::PktScratch,
    msg: u32,
    ifindex: u32,
) -> Option<i32> {
    if s.packet.v6 || s.packet.l4 != ETH_HLEN + 20 {
        return None;
    }
    let (src, dst) = (as_v4(&s.value.daddr)?, as_v4(&s.value.saddr)?);
    load_into(ctx, 0, &mut s.macs[6..], 6)?;
    load_into(ctx, 6, &mut s.macs[..6], 6)?;
    ctx.make_room((ETH_HLEN + QUOTE) as u32, 28).ok()?;
    let b = &mut s.icmp;
    // The quoted packet, now 28 bytes further.
    load_into(ctx, ETH_HLEN + 28, &mut b[28..], QUOTE as u32)?;
    b[..28].fill(0);
    b[0] = 0x45;
    b[2..4].copy_from_slice(&(ICMP_REPLY_LEN as u16).to_be_bytes());
    b[8] = 64;
    b[9] = IPPROTO_ICMP;
    b[12..16].copy_from_slice(&src);
    b[16..20].copy_from_slice(&dst);
    let ip_sum = csum_fold(csum_add(0, &b[..20]));
    b[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    b[20] = (msg >> 24) as u8;
    b[21] = (msg >> 16) as u8;
    b[26..28].copy_from_slice(&(msg as u16).to_be_bytes());
    let icmp_sum = csum_fold(csum_add(0, &b[20..]));
    b[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
    ctx.store(0, &s.macs, flags).ok()?;
    ctx.store(ETH_HLEN, &s.icmp, flags).ok()?;
    Some(ctx.redirect(ifindex))
}

/// [`forward`]'s answer for a packet larger than the next hop's MTU (not a verdict):
/// the caller decides whether the stack may answer it with fragmentation-needed.
pub(crate) const TOO_BIG: i32 = i32::MIN + 1;
/// [`forward`]'s answer for a packet to one of the node's own addresses (a backend in
/// the host's network namespace): the caller hands it to the stack.
pub(crate) const LOCAL: i32 = i32::MIN + 2;
/// [`forward`]'s answer, in XDP, for a packet this hook does not send: its next hop's
/// link-layer address is not known yet (no `bpf_redirect_neigh` here), or it leaves by
/// another interface than it came in by (whose driver may not take XDP frames; a veth's
/// peer drops them unless it runs NAPI). The caller undoes what it changed and hands the
/// packet on to tc, which sends it.
pub(crate) const HAND_ON: i32 = i32::MIN + 3;
