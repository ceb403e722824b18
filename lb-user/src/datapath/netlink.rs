//! Netlink, the little the agent needs of it: a socket, a request and its
//! acknowledgement, a dump, the messages and attributes of a reply. Used for
//! `SOCK_DESTROY` ([`super::sockets`]) and for the tc filters of a clsact qdisc
//! ([`super::tcfilter`]), which aya can attach and detach but not list.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NETLINK_ROUTE: i32 = 0;
pub const NETLINK_SOCK_DIAG: i32 = 4;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
pub const HDR: usize = 16;

/// A netlink socket of `protocol`, whose reads give up after 5 s.
pub fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) with a live timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

/// A message: the header (type `ty`, `flags`, sequence 1) and `body`.
pub fn message(ty: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + body.len());
    m.extend_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.extend_from_slice(body);
    m
}

pub fn send(nl: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: send(2) of a live buffer of the length passed.
    let n = unsafe { libc::send(nl.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(nl: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) into a live buffer of the length passed.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The netlink messages in `buf`: (type, payload).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + HDR > buf.len() {
            return None;
        }
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2"));
        if len < HDR || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + HDR..at + len];
        at += len.next_multiple_of(4);
        Some((ty, payload))
    })
}

/// The attributes (`struct rtattr`/`nlattr`: length, type, value) in `buf`: (type without
/// its nested and byte-order flags, value).
pub fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let value = &buf[at + 4..at + len];
        at += len.next_multiple_of(4);
        Some((ty, value))
    })
}

/// A netlink error message's errno (0: an acknowledgement).
fn errno_of(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4")))
}

/// Sends the dump request `msg` and calls `each` with every reply message's type and
/// payload until the dump is done.
pub fn dump(nl: &OwnedFd, msg: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    send(nl, msg)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(nl, &mut buf)?;
        for (ty, payload) in messages(&buf[..n]) {
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(io::Error::from_raw_os_error(-errno_of(payload))),
                _ => each(ty, payload),
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Sends the request `msg` (which asks for an acknowledgement) and waits for it.
pub fn request(nl: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    send(nl, msg)?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = recv(nl, &mut buf)?;
        for (ty, payload) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR {
                return match errno_of(payload) {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
        }
        if n == 0 {
            return Err(io::Error::other("netlink: no acknowledgement"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_are_split_at_their_padded_lengths() {
        let m = message(20, NLM_F_REQUEST | NLM_F_DUMP, &[1, 2, 3, 4]);
        assert_eq!(m.len(), HDR + 4);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 0x301);
        // Two messages back to back, the first padded to 4 bytes.
        let mut buf = Vec::new();
        buf.extend_from_slice(&18u32.to_ne_bytes());
        buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf.extend_from_slice(&[0; 10]);
        buf.extend_from_slice(&[7, 7, 0, 0]); // payload 2 bytes + 2 of padding
        buf.extend_from_slice(&16u32.to_ne_bytes());
        buf.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend_from_slice(&[0; 10]);
        let got: Vec<(u16, usize)> = messages(&buf).map(|(t, p)| (t, p.len())).collect();
        assert_eq!(got, [(NLMSG_ERROR, 2), (NLMSG_DONE, 0)]);
        // Attributes: "bpf\0" (kind, 8 bytes), then a nested one (flag 0x8000) holding a
        // 5-byte value padded to 8; a truncated one at the end is left out.
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&8u16.to_ne_bytes());
        attrs.extend_from_slice(&1u16.to_ne_bytes());
        attrs.extend_from_slice(b"bpf\0");
        attrs.extend_from_slice(&9u16.to_ne_bytes());
        attrs.extend_from_slice(&(2u16 | 0x8000).to_ne_bytes());
        attrs.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        attrs.extend_from_slice(&40u16.to_ne_bytes());
        attrs.extend_from_slice(&3u16.to_ne_bytes());
        let got: Vec<(u16, &[u8])> = attributes(&attrs).collect();
        assert_eq!(got, [(1, &b"bpf\0"[..]), (2, &[1, 2, 3, 4, 5][..])]);
    }
}
