//! The bpf filters of a clsact qdisc, listed (`RTM_GETTFILTER`): where kernels lack TCX
//! the tc programs are filters there, with no link to pin, and the agent finds its own
//! by name to replace them in place, to remove the ones left by an older start or on an
//! interface no longer served, and for `lb-user cleanup`.

use std::io;

use aya::programs::TcAttachType;

use super::netlink;

const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;

/// One bpf filter of a clsact qdisc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The name the loader gave it (ours: the program's name).
    pub name: String,
    pub prog_id: u32,
}

/// The clsact qdisc's parent id of `attach` (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS or
/// TC_H_MIN_EGRESS)`).
fn parent(attach: TcAttachType) -> u32 {
    match attach {
        TcAttachType::Egress => 0xffff_fff3,
        TcAttachType::Ingress => 0xffff_fff2,
        TcAttachType::Custom(p) => p,
    }
}

/// A `struct tcmsg` asking for the filters of `ifindex` under `parent`.
fn request(ifindex: u32, parent: u32) -> Vec<u8> {
    let mut tcmsg = Vec::with_capacity(20);
    tcmsg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    tcmsg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes()); // handle
    tcmsg.extend_from_slice(&parent.to_ne_bytes());
    tcmsg.extend_from_slice(&0u32.to_ne_bytes()); // info: every priority and protocol
    netlink::message(
        RTM_GETTFILTER,
        netlink::NLM_F_REQUEST | netlink::NLM_F_DUMP,
        &tcmsg,
    )
}

/// The bpf filter an `RTM_NEWTFILTER` payload describes (`None`: another kind, or the
/// priority's own entry, which has no handle).
fn parse(payload: &[u8]) -> Option<Filter> {
    let field = |at: usize| u32::from_ne_bytes(payload.get(at..at + 4)?.try_into().ok()?).into();
    let handle: Option<u32> = field(8);
    let info: u32 = field(16)?;
    let (mut name, mut prog_id) = (None, None);
    for (ty, value) in netlink::attributes(payload.get(20..)?) {
        if ty != TCA_OPTIONS {
            continue;
        }
        for (ty, value) in netlink::attributes(value) {
            match ty {
                TCA_BPF_NAME => {
                    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                    name = Some(String::from_utf8_lossy(&value[..end]).into_owned());
                }
                TCA_BPF_ID => {
                    prog_id = value
                        .get(..4)
                        .map(|b| u32::from_ne_bytes(b.try_into().expect("4")))
                }
                _ => {}
            }
        }
    }
    Some(Filter {
        priority: (info >> 16) as u16,
        handle: handle.filter(|h| *h != 0)?,
        name: name?,
        prog_id: prog_id.unwrap_or(0),
    })
}

/// The bpf filters of the clsact qdisc of interface `ifindex` at `attach`, in this
/// thread's network namespace. An interface without a clsact qdisc has none.
pub fn list(ifindex: u32, attach: TcAttachType) -> io::Result<Vec<Filter>> {
    let nl = netlink::socket(netlink::NETLINK_ROUTE)?;
    let mut found = Vec::new();
    let result = netlink::dump(&nl, &request(ifindex, parent(attach)), |ty, payload| {
        if ty == RTM_NEWTFILTER
            && let Some(f) = parse(payload)
        {
            found.push(f);
        }
    });
    match result {
        Ok(()) => Ok(found),
        // No clsact qdisc (older kernels say EINVAL, newer ones ENOENT).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(found),
        Err(e) => Err(e),
    }
}

/// Every interface of this thread's network namespace: (index, name).
pub fn interfaces() -> Vec<(u32, String)> {
    // SAFETY: if_nameindex(3) returns an array ending in a zero entry, or null; it is
    // read before if_freenameindex frees it.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Vec::new();
        }
        let mut found = Vec::new();
        let mut at = list;
        while (*at).if_index != 0 && !(*at).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*at).if_name);
            found.push(((*at).if_index, name.to_string_lossy().into_owned()));
            at = at.add(1);
        }
        libc::if_freenameindex(list);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `RTM_NEWTFILTER` payload: tcmsg, then `TCA_KIND` and `TCA_OPTIONS` holding the
    /// bpf filter's name and program id.
    fn payload(priority: u16, handle: u32, name: Option<&str>, id: u32) -> Vec<u8> {
        let attr = |ty: u16, value: &[u8]| {
            let mut a = Vec::new();
            a.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
            a.extend_from_slice(&ty.to_ne_bytes());
            a.extend_from_slice(value);
            a.resize(a.len().next_multiple_of(4), 0);
            a
        };
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&7i32.to_ne_bytes());
        p.extend_from_slice(&handle.to_ne_bytes());
        p.extend_from_slice(&0xffff_fff2u32.to_ne_bytes());
        p.extend_from_slice(&(u32::from(priority) << 16 | 0x0300).to_ne_bytes());
        p.extend(attr(1, b"bpf\0"));
        let mut opts = Vec::new();
        if let Some(n) = name {
            opts.extend(attr(TCA_BPF_NAME, format!("{n}\0").as_bytes()));
        }
        opts.extend(attr(TCA_BPF_ID, &id.to_ne_bytes()));
        p.extend(attr(TCA_OPTIONS | 0x8000, &opts));
        p
    }

    #[test]
    fn a_filter_reads_as_priority_handle_name_and_program() {
        assert_eq!(
            parse(&payload(1, 0x1b, Some("lb_tc_ingress"), 42)),
            Some(Filter {
                priority: 1,
                handle: 0x1b,
                name: "lb_tc_ingress".into(),
                prog_id: 42,
            })
        );
        // The priority's own entry (no handle) and a filter without a name are not ours.
        assert_eq!(parse(&payload(1, 0, None, 0)), None);
        assert_eq!(parse(&payload(1, 1, None, 5)), None);
        assert_eq!(parse(&[0; 12]), None);
        let r = request(7, parent(TcAttachType::Egress));
        assert_eq!(r.len(), netlink::HDR + 20);
        assert_eq!(&r[20..24], &7i32.to_ne_bytes());
        assert_eq!(&r[28..32], &0xffff_fff3u32.to_ne_bytes());
    }
}
