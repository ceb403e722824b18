//! The node's interfaces for the packet level: which ones carry its addresses, their
//! ifindex and IPv4 address (the SNAT source), and the SNAT port range kept away from
//! the host's own sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};

/// An interface the tc programs are attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    /// The node's IPv4 address on it: the `--node-ip` one if it is there, else the first.
    pub addr4: Option<Ipv4Addr>,
    /// Its IPv6 address likewise (link-local ones are not used).
    pub addr6: Option<Ipv6Addr>,
}

/// Every (interface name, address) pair of this network namespace.
pub fn addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: sa_family says which sockaddr this is.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        out.push((name, addr));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// `ARPHRD_*` link types the tc programs can parse: Ethernet, and loopback (whose frames
/// carry an Ethernet header too).
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

/// The link type (`ARPHRD_*`) of interface `name`, from `SIOCGIFHWADDR`; `None` when it
/// cannot be read.
fn link_type(name: &str) -> Option<u16> {
    // SAFETY: a plain C struct; all zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    let ret = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR as _, &mut req) };
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if ret != 0 {
        return None;
    }
    // SAFETY: the union member SIOCGIFHWADDR wrote.
    Some(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Why interface `name` of link type `kind` cannot carry the packet level, if it cannot.
pub fn unsupported_link(name: &str, kind: Option<u16>) -> Option<String> {
    match kind {
        None | Some(ARPHRD_ETHER | ARPHRD_LOOPBACK) => None,
        Some(t) => Some(format!(
            "interface {name} is not Ethernet (link type {t}{}): the packet level's tc programs \
             parse Ethernet frames; attach them to the node's Ethernet interfaces (--interface)",
            match t {
                65534 => ", none: a tun, WireGuard or other IP-only device",
                776 => ", an IPv6-in-IPv4 tunnel",
                768 => ", an IP-in-IP tunnel",
                _ => "",
            }
        )),
    }
}

/// The interfaces to attach to: those named (`--interface`), else those that carry one
/// of `node_ips`. Errors name the interface that does not exist, or that is named and
/// not Ethernet; one not named that is not Ethernet is left out with a warning.
pub fn resolve(
    names: &[String],
    node_ips: &[IpAddr],
    addrs: &[(String, IpAddr)],
) -> Result<Vec<Iface>, String> {
    let explicit = !names.is_empty();
    let mut chosen: Vec<String> = names.to_vec();
    if chosen.is_empty() {
        for (name, addr) in addrs {
            if node_ips.contains(addr) && !chosen.contains(name) {
                chosen.push(name.clone());
            }
        }
    }
    chosen
        .into_iter()
        .map(|name| {
            let c = std::ffi::CString::new(name.clone())
                .map_err(|_| format!("--interface {name:?}: not an interface name"))?;
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if ifindex == 0 {
                return Err(format!(
                    "--interface {name}: no such interface in this network namespace"
                ));
            }
            if let Some(why) = unsupported_link(&name, link_type(&name)) {
                if explicit {
                    return Err(format!("--interface {name}: {why}"));
                }
                tracing::warn!("{why}; it carries a node address and is left out");
                return Ok(None);
            }
            let on_iface: Vec<IpAddr> = addrs
                .iter()
                .filter(|(n, a)| *n == name && !is_link_local(a))
                .map(|(_, a)| *a)
                .collect();
            // The --node-ip one of the family if it is there, else the first.
            let pick = |v4: bool| {
                let family = || on_iface.iter().filter(move |a| a.is_ipv4() == v4);
                family()
                    .find(|a| node_ips.contains(a))
                    .or_else(|| family().next())
                    .copied()
            };
            Ok(Some(Iface {
                name,
                ifindex,
                addr4: pick(true).and_then(|a| match a {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                }),
                addr6: pick(false).and_then(|a| match a {
                    IpAddr::V6(v6) => Some(v6),
                    IpAddr::V4(_) => None,
                }),
            }))
        })
        .filter_map(Result::transpose)
        .collect()
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// `ip_local_reserved_ports` with the SNAT range added (unchanged if it is there).
pub fn with_snat_range(reserved: &str) -> String {
    let range = format!("{SNAT_PORT_MIN}-{SNAT_PORT_MAX}");
    let reserved = reserved.trim();
    if reserved.split(',').any(|r| r.trim() == range) {
        reserved.to_string()
    } else if reserved.is_empty() {
        range
    } else {
        format!("{reserved},{range}")
    }
}

/// Reserves the SNAT port range in this network namespace so no host socket binds one.
pub fn reserve_snat_ports() -> std::io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let now = std::fs::read_to_string(PATH)?;
    let wanted = with_snat_range(&now);
    if wanted != now.trim() {
        std::fs::write(PATH, &wanted)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_range_is_added_once() {
        assert_eq!(with_snat_range("\n"), "61000-63999");
        assert_eq!(with_snat_range("8080\n"), "8080,61000-63999");
        assert_eq!(with_snat_range("8080,61000-63999\n"), "8080,61000-63999");
    }

    #[test]
    fn only_ethernet_and_loopback_links_are_usable() {
        assert_eq!(unsupported_link("eth0", Some(ARPHRD_ETHER)), None);
        assert_eq!(unsupported_link("lo", Some(ARPHRD_LOOPBACK)), None);
        let why = unsupported_link("wg0", Some(65534)).unwrap();
        assert!(why.contains("interface wg0 is not Ethernet"), "{why}");
        assert!(why.contains("WireGuard"), "{why}");
    }

    #[test]
    fn interfaces_default_to_those_with_node_addresses() {
        let addrs = vec![
            ("lo".to_string(), "127.0.0.1".parse().unwrap()),
            ("lo".to_string(), "::1".parse().unwrap()),
        ];
        // lo exists everywhere; it carries 127.0.0.1.
        let got = resolve(&[], &["127.0.0.1".parse().unwrap()], &addrs).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "lo");
        assert_eq!(got[0].addr4, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(got[0].addr6, Some(Ipv6Addr::LOCALHOST));
        assert!(
            resolve(&[], &["192.0.2.1".parse().unwrap()], &addrs)
                .unwrap()
                .is_empty()
        );
        // lo's frames carry an Ethernet header: it is usable.
        assert_eq!(link_type("lo"), Some(ARPHRD_LOOPBACK));
        let err = resolve(&["nope0".to_string()], &[], &addrs).unwrap_err();
        assert!(
            err.contains("--interface nope0: no such interface"),
            "{err}"
        );
    }
}
