//! One packet API over the two hooks that see whole frames, tc ([`TcContext`]) and XDP
//! ([`XdpContext`]), as Cilium's `ctx_*` functions are over `__sk_buff` and `xdp_md`:
//! loading and storing bytes, checksum updates, the interface, making room for an ICMP
//! error, redirecting, and the verdicts. The packet level ([`crate::packet`], [`crate::nat`],
//! [`crate::ct`]) is written once, generic over [`Ctx`]; each hook's entry point is a
//! thin call into it (monomorphised: the verifier sees plain code for each).
//!
//! Checksums: tc has the kernel's helpers (`bpf_l3_csum_replace`,
//! `bpf_l4_csum_replace`), which also keep the skb's checksum state right; XDP has no
//! skb, so the same incremental update (RFC 1624) is done by hand on the field.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, xdp_action,
    },
    helpers::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::csum_replace;

/// A helper's error (a negative errno).
pub(crate) type Error = i64;

/// A packet as a hook hands it to a program: what the packet level needs of it.
pub(crate) trait Ctx: EbpfContext {
    /// Not ours: the next program (or the stack) decides.
    const NEXT: i32;
    /// To the node's stack, now.
    const PASS: i32;
    /// Dropped.
    const DROP: i32;
    /// Whether `bpf_redirect_neigh` is there (tc); without it a packet whose next hop's
    /// address is not known yet is handed on ([`Ctx::NEXT`]) to a hook that has it.
    const HAS_NEIGH: bool;
    /// The counters' index (`PROG_*`) of the program that handles a packet from outside.
    const PROG_IN: u32;
    /// `bpf_check_mtu`'s flags: tc checks each segment of a GSO packet; XDP has none.
    const MTU_FLAGS: u64;

    /// `size_of::<T>()` bytes at `off`.
    fn load<T>(&self, off: usize) -> Result<T, Error>;
    /// `len` bytes at `off` into `dst` (the caller checked it holds `len`).
    fn load_bytes(&self, off: usize, dst: *mut c_void, len: u32) -> Result<(), Error>;
    /// `v` written at `off`; `flags` are the skb's (`BPF_F_RECOMPUTE_CSUM`), which XDP
    /// has no use for.
    fn store<T>(&self, off: usize, v: &T, flags: u64) -> Result<(), Error>;
    /// The IPv4 header checksum at `off` updated for a change of `size` (2 or 4) bytes
    /// from `from` to `to` (as loaded: network order).
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), Error>;
    /// An L4 checksum at `off` updated likewise; `flags` as `bpf_l4_csum_replace`'s
    /// (the size in the low bits, `BPF_F_PSEUDO_HDR`, `BPF_F_MARK_MANGLED_0`).
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), Error>;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// Cuts the packet to `keep` bytes, then opens `room` bytes right after its
    /// Ethernet header (which stays in front, its type IPv4).
    fn make_room(&self, keep: u32, room: u32) -> Result<(), Error>;
    /// Whether [`Ctx::redirect`] sends by `ifindex`: tc sends by any interface; XDP
    /// only back out of the one the frame came in by (`XDP_TX`, which every driver with
    /// native XDP has).
    fn sends_by(&self, ifindex: u32) -> bool;
    /// Sends the packet out of `ifindex` (the frame's addresses already written).
    fn redirect(&self, ifindex: u32) -> i32;
    /// Sends the packet out of `ifindex` with the next hop's address resolved by the
    /// kernel (only where [`Ctx::HAS_NEIGH`]).
    fn redirect_neigh(&self, ifindex: u32) -> i32;
}

impl Ctx for TcContext {
    const NEXT: i32 = -1; // TCX_NEXT
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;
    const HAS_NEIGH: bool = true;
    const PROG_IN: u32 = lb_common::PROG_TC_INGRESS;
    const MTU_FLAGS: u64 = BPF_MTU_CHK_SEGS as u64;

    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, Error> {
        TcContext::load(self, off)
    }

    #[inline(always)]
    fn load_bytes(&self, off: usize, dst: *mut c_void, len: u32) -> Result<(), Error> {
        // SAFETY: `dst` holds `len` bytes (the caller's check); the helper checks the
        // packet's bounds.
        let ret = unsafe { bpf_skb_load_bytes(self.skb.skb as *const _, off as u32, dst, len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T, flags: u64) -> Result<(), Error> {
        // SAFETY: `v` is `size_of::<T>()` bytes; the helper checks the packet's bounds.
        let ret = unsafe {
            bpf_skb_store_bytes(
                self.skb.skb.cast(),
                off as u32,
                core::ptr::from_ref(v).cast(),
                size_of::<T>() as u32,
                flags,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), Error> {
        TcContext::l3_csum_replace(self, off, from, to, size)
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), Error> {
        TcContext::l4_csum_replace(self, off, from, to, flags)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context's sk_buff is valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn make_room(&self, keep: u32, room: u32) -> Result<(), Error> {
        // SAFETY: the context's sk_buff, a length and no flags.
        let ret = unsafe { bpf_skb_change_tail(self.skb.skb, keep, 0) };
        if ret != 0 {
            return Err(ret);
        }
        self.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0)
    }

    #[inline(always)]
    fn sends_by(&self, _ifindex: u32) -> bool {
        true
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> i32 {
        // SAFETY: a helper with plain integers.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }

    #[inline(always)]
    fn redirect_neigh(&self, ifindex: u32) -> i32 {
        // SAFETY: a helper with plain integers and no parameters struct.
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }
}

impl Ctx for XdpContext {
    const NEXT: i32 = xdp_action::XDP_PASS as i32;
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    const HAS_NEIGH: bool = false;
    const PROG_IN: u32 = lb_common::PROG_XDP;
    const MTU_FLAGS: u64 = 0;

    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, Error> {
        let mut v = MaybeUninit::<T>::uninit();
        self.load_bytes(off, v.as_mut_ptr().cast(), size_of::<T>() as u32)?;
        // SAFETY: the helper filled every byte.
        Ok(unsafe { v.assume_init() })
    }

    #[inline(always)]
    fn load_bytes(&self, off: usize, dst: *mut c_void, len: u32) -> Result<(), Error> {
        // SAFETY: `dst` holds `len` bytes (the caller's check); the helper checks the
        // packet's bounds.
        let ret = unsafe { bpf_xdp_load_bytes(self.ctx, off as u32, dst, len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T, _flags: u64) -> Result<(), Error> {
        // SAFETY: `v` is `size_of::<T>()` bytes, only read; the helper checks the
        // packet's bounds.
        let ret = unsafe {
            bpf_xdp_store_bytes(
                self.ctx,
                off as u32,
                core::ptr::from_ref(v).cast_mut().cast(),
                size_of::<T>() as u32,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn l3_csum_replace(&self, off: usize, from: u64, to: u64, size: u64) -> Result<(), Error> {
        let old: u16 = Ctx::load(self, off)?;
        Ctx::store(
            self,
            off,
            &csum_replace(old, from as u32, to as u32, size as u8),
            0,
        )
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Result<(), Error> {
        let old: u16 = Ctx::load(self, off)?;
        let mangled0 = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        // UDP without a checksum (0) stays without one.
        if mangled0 && old == 0 {
            return Ok(());
        }
        let mut new = csum_replace(old, from as u32, to as u32, (flags & 0xf) as u8);
        // A computed 0 is sent as all ones: 0 would mean "no checksum" (RFC 768).
        if mangled0 && new == 0 {
            new = 0xffff;
        }
        Ctx::store(self, off, &new, 0)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn make_room(&self, keep: u32, room: u32) -> Result<(), Error> {
        // SAFETY: the context and a length.
        let len = unsafe { bpf_xdp_get_buff_len(self.ctx) } as i32;
        // SAFETY: the context and a (negative) length change.
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx, keep as i32 - len) };
        if ret != 0 {
            return Err(ret);
        }
        // SAFETY: the context and a length change; the head room is the driver's.
        let ret = unsafe { bpf_xdp_adjust_head(self.ctx, -(room as i32)) };
        if ret != 0 {
            return Err(ret);
        }
        // The new front: the caller writes the MAC addresses; the type is IPv4.
        Ctx::store(self, 12, &0x0800u16.to_be(), 0)
    }

    #[inline(always)]
    fn sends_by(&self, ifindex: u32) -> bool {
        ifindex == self.ifindex()
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> i32 {
        if ifindex == self.ifindex() {
            // Back out where it came in.
            return xdp_action::XDP_TX as i32;
        }
        // SAFETY: a helper with plain integers.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }

    #[inline(always)]
    fn redirect_neigh(&self, _ifindex: u32) -> i32 {
        Self::NEXT
    }
}
