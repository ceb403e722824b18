//! Map keys and values shared by the eBPF programs (lb-ebpf) and the agent (lb-user).
//!
//! Rules for every type here:
//! * `#[repr(C)]`, every padding byte is an explicit `_pad` field (bytemuck's `Pod` derive
//!   refuses implicit padding), and a compile-time size assertion pins the layout.
//! * No `bool` or enum fields: flags and kinds are `u8` with named constants.
//! * Byte order, per field: addresses are `[u8; 4]` octets exactly as on the wire (so
//!   `bpftool map dump` prints `[10,96,0,10]`); ports are **host** order `u16` (so
//!   `bpftool` prints `80`, and the programs convert with one `from_be`/`to_be`).
//!
//! Map names carry a layout version (`_V1`): a changed layout gets a new name, so an agent
//! never misreads maps pinned by an older one.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers as in the IP header (`IPPROTO_*`).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ServiceKey4::scope`: which set of backends a frontend entry lists. Only the
/// external scope (all usable backends) exists so far; internal-traffic-policy
/// entries will use another scope value.
pub const SCOPE_EXTERNAL: u8 = 0;

/// Names of the maps, as declared in lb-ebpf and pinned under the pin directory.
pub const MAP_SERVICES4: &str = "LB4_SERVICES_V1";
pub const MAP_BACKENDS4: &str = "LB4_BACKENDS_V1";
pub const MAP_REVNAT4: &str = "LB4_REVNAT_V1";
pub const MAP_SOCK_REVNAT4: &str = "LB4_SOCK_REVNAT_V1";
pub const MAP_COUNTERS: &str = "LB_COUNTERS_V1";
/// Every map the agent pins.
pub const PINNED_MAPS: [&str; 5] = [
    MAP_SERVICES4,
    MAP_BACKENDS4,
    MAP_REVNAT4,
    MAP_SOCK_REVNAT4,
    MAP_COUNTERS,
];

/// Capacity of the maps.
pub const MAX_SERVICE_ENTRIES: u32 = 262_144;
pub const MAX_BACKENDS: u32 = 262_144;
pub const MAX_REVNAT: u32 = 65_536;
pub const MAX_SOCK_REVNAT: u32 = 262_144;
/// Backends one frontend may list (slots 1..=MAX_SLOTS).
pub const MAX_SLOTS: u16 = 65_535;

/// Key of the services map: one frontend (address, port, protocol, scope) and a slot.
/// Slot 0 is the header ([`ServiceValue::count`] etc.); slots `1..=count` each hold
/// one backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey4 {
    /// Frontend IPv4 address, network order octets.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    /// 0 = header, 1..=count = backend slots. Host order.
    pub slot: u16,
    pub _pad: [u8; 2],
}

impl ServiceKey4 {
    pub const fn new(addr: [u8; 4], port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: SCOPE_EXTERNAL,
            slot,
            _pad: [0; 2],
        }
    }

    /// The same frontend at another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Value of the services map. In the header (slot 0) `count`, `rev_nat_id`,
/// `affinity_timeout` and `flags` are meaningful and `backend_id` is 0; in a backend slot
/// only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Slot entries: id of a backend in the backends map. Host order.
    pub backend_id: u32,
    /// Header: number of backend slots. 0 means the service exists but has no usable
    /// endpoint: connections are refused. Host order.
    pub count: u16,
    /// Header: id of the frontend in the rev-NAT map. Host order.
    pub rev_nat_id: u16,
    /// Header: ClientIP affinity timeout in seconds, 0 = no affinity. Host order.
    pub affinity_timeout: u32,
    /// Header: `SVC_F_*` flags.
    pub flags: u8,
    pub _pad: [u8; 3],
}

impl ServiceValue {
    pub const fn header(count: u16, rev_nat_id: u16) -> Self {
        Self {
            backend_id: 0,
            count,
            rev_nat_id,
            affinity_timeout: 0,
            flags: 0,
            _pad: [0; 3],
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            rev_nat_id: 0,
            affinity_timeout: 0,
            flags: 0,
            _pad: [0; 3],
        }
    }
}

/// Value of the backends map (key: backend id, `u32`, host order; 0 is never used).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend4 {
    /// Backend (pod) IPv4 address, network order octets.
    pub addr: [u8; 4],
    /// Backend (target) port, host order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
}

/// Value of the rev-NAT map (key: rev-NAT id, `u16`, host order): the frontend a
/// translated socket reports as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RevNat4 {
    /// Frontend IPv4 address, network order octets.
    pub addr: [u8; 4],
    /// Frontend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of the socket rev-NAT map (LRU): a translated socket and the backend it talks to.
/// The value is the [`RevNat4`] frontend that getpeername() and recvmsg() report.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRevNatKey4 {
    /// `bpf_get_socket_cookie()`, host order.
    pub cookie: u64,
    /// Backend IPv4 address, network order octets.
    pub addr: [u8; 4],
    /// Backend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Per-program counters (a per-CPU array indexed by `PROG_*`; sum over CPUs to read).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Destinations (or, for recvmsg/getpeername, peers) rewritten.
    pub translated: u64,
    /// Connections or datagrams refused: a service without backends.
    pub refused: u64,
    /// Backends chosen from a ClientIP affinity entry.
    pub affinity_hits: u64,
    /// A lookup that should have hit did not (slot, backend or rev-NAT entry missing,
    /// rev-NAT map full).
    pub misses: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.translated += other.translated;
        self.refused += other.refused;
        self.affinity_hits += other.affinity_hits;
        self.misses += other.misses;
    }
}

/// Indexes of the counters map, one per program.
pub const PROG_CONNECT4: u32 = 0;
pub const PROG_SENDMSG4: u32 = 1;
pub const PROG_RECVMSG4: u32 = 2;
pub const PROG_GETPEERNAME4: u32 = 3;
/// Names of the programs by counter index.
pub const PROG_NAMES: [&str; 4] = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];

/// Picks the slot (1..=count) for a random number; `None` when there is no backend.
/// Shared by the program and the host tests so the choice logic is tested off-kernel.
#[inline(always)]
pub const fn pick_slot(count: u16, random: u32) -> Option<u16> {
    if count == 0 {
        None
    } else {
        Some((random % count as u32) as u16 + 1)
    }
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey4>() == 12);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<Backend4>() == 8);
    assert!(core::mem::size_of::<RevNat4>() == 8);
    assert!(core::mem::size_of::<SockRevNatKey4>() == 16);
    assert!(core::mem::size_of::<Counters>() == 32);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `bytemuck::Pod`: plain old data without padding.
    unsafe impl aya::Pod for super::ServiceKey4 {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::RevNat4 {}
    unsafe impl aya::Pod for super::SockRevNatKey4 {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_are_wire_address_then_host_port() {
        let key = ServiceKey4::new([10, 96, 0, 10], 80, PROTO_TCP, 2);
        let bytes = bytemuck::bytes_of(&key);
        assert_eq!(&bytes[0..4], &[10, 96, 0, 10]);
        assert_eq!(&bytes[4..6], &80u16.to_ne_bytes());
        assert_eq!(bytes[6], PROTO_TCP);
        assert_eq!(bytes[7], SCOPE_EXTERNAL);
        assert_eq!(&bytes[8..10], &2u16.to_ne_bytes());
        assert_eq!(&bytes[10..12], &[0, 0]);
    }

    #[test]
    fn kernel_sock_addr_fields_map_to_key_fields() {
        // bpf_sock_addr.user_ip4 holds the address in network order as a u32 in memory,
        // user_port the port in network order in its low 16 bits.
        let user_ip4 = u32::from_ne_bytes([10, 96, 0, 10]);
        let user_port: u32 = u32::from(8080u16.to_be());
        assert_eq!(user_ip4.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(u16::from_be(user_port as u16), 8080);
    }

    #[test]
    fn pick_slot_covers_every_slot_and_never_zero() {
        assert_eq!(pick_slot(0, 12345), None);
        let mut seen = [false; 4];
        for r in 0..100u32 {
            let s = pick_slot(3, r).unwrap();
            assert!((1..=3).contains(&s));
            seen[s as usize] = true;
        }
        assert_eq!(seen, [false, true, true, true]);
        assert_eq!(pick_slot(1, u32::MAX), Some(1));
        assert_eq!(
            pick_slot(u16::MAX, u32::MAX),
            Some((u32::MAX % 65535) as u16 + 1)
        );
    }

    #[test]
    fn with_slot_keeps_frontend() {
        let k = ServiceKey4::new([1, 2, 3, 4], 53, PROTO_UDP, 0);
        let s = k.with_slot(7);
        assert_eq!(
            (s.addr, s.port, s.proto, s.slot),
            ([1, 2, 3, 4], 53, PROTO_UDP, 7)
        );
    }
}
