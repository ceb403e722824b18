//! An XDP program that passes every frame, for the LAN side of a node's veth: a veth
//! hands the frames its peer sends back with `XDP_TX` on to its stack only when it has
//! an XDP program itself (the kernel schedules its queue for XDP frames then; with GRO
//! alone they wait in the queue until some other frame arrives). A real NIC needs
//! nothing of the kind: this stands in for the wire.
//!
//! Two instructions (`r0 = XDP_PASS; exit`), loaded with `BPF_PROG_LOAD` and attached
//! in native mode with a BPF link (`BPF_LINK_CREATE`) from a thread inside the
//! interface's namespace; the link's file descriptor keeps it attached.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::Context as _;

use crate::lab::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: u8 = 2;

/// `r0 = XDP_PASS` (BPF_ALU64 | BPF_MOV | BPF_K), then `exit` (BPF_JMP | BPF_EXIT).
const PROGRAM: [[u8; 8]; 2] = [
    [0xb7, 0, 0, 0, XDP_PASS, 0, 0, 0],
    [0x95, 0, 0, 0, 0, 0, 0, 0],
];

/// `bpf(cmd, attr)`; `attr` is the command's union member, zero past its fields.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is 128 bytes, more than either command reads, and outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The program, loaded: its file descriptor.
fn load() -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u64; 16];
    // prog_type (u32) and insn_cnt (u32), insns (pointer), license (pointer).
    attr[0] = u64::from(BPF_PROG_TYPE_XDP) | ((PROGRAM.len() as u64) << 32);
    attr[1] = PROGRAM.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: a new file descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the pass-everything program, native mode, to interface `dev` of namespace
/// `ns` (a veth whose peer's XDP program sends frames back out with `XDP_TX`). It stays
/// attached as long as the returned link is open (or the interface exists).
pub fn attach(ns: &Netns, dev: &str) -> anyhow::Result<OwnedFd> {
    let prog = load().context("loading the XDP pass program")?;
    let netns = ns.file()?;
    let name = CString::new(dev)?;
    let what = || format!("attaching the XDP pass program to {dev} in {}", ns.name);
    // setns(2) moves only the calling thread: a thread of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<OwnedFd> {
                // SAFETY: setns(2) with an open namespace file, for this thread only.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error()).context("entering the namespace");
                }
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                if ifindex == 0 {
                    return Err(io::Error::last_os_error()).context("no such interface");
                }
                let mut attr = [0u64; 16];
                // prog_fd (u32), target_ifindex (u32); attach_type (u32), flags (u32).
                attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
                attr[1] = u64::from(BPF_XDP) | (u64::from(XDP_FLAGS_DRV_MODE) << 32);
                let fd = bpf(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE")?;
                // SAFETY: a new file descriptor the kernel just gave us.
                Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
    })
    .with_context(what)
}
