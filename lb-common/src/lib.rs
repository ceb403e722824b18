//! Map keys and values shared by the eBPF programs (lb-ebpf) and the agent (lb-user).
//!
//! Rules for every type here:
//! * `#[repr(C)]`, every padding byte is an explicit `_pad` field (bytemuck's `Pod` derive
//!   refuses implicit padding), and a compile-time size assertion pins the layout.
//! * No `bool` or enum fields: flags and kinds are `u8` with named constants.
//! * Byte order, per field: addresses of both families are an [`Addr`], 16 octets exactly
//!   as on the wire, IPv4 as the IPv4-mapped IPv6 address (so `bpftool map dump` prints
//!   `[0,0,0,0,0,0,0,0,0,0,255,255,10,96,0,10]` for 10.96.0.10); ports are **host** order
//!   `u16` (so `bpftool` prints `80`, and the programs convert with one `from_be`/`to_be`).
//!
//! Map names carry a layout version (`LB_SERVICES_V2`, `LB_AFFINITY_V1`, ...): a changed
//! layout gets a new name, so an agent never misreads maps pinned by an older one. The
//! kernel side declares the maps under the same names in `lb-ebpf/src/maps.rs`.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers as in the IP header (`IPPROTO_*`).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ServiceKey::scope`: which set of backends a frontend entry lists. The external
/// scope lists every usable backend: the socket level always uses it, and so does the
/// packet level unless the frontend also has a local scope.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Only this node's backends: the packet level's choice for clients outside the node
/// when the service has `externalTrafficPolicy: Local` (no local backend: dropped).
pub const SCOPE_LOCAL: u8 = 1;

/// `Backend::flags`: the backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1;

/// Names of the maps, as declared in lb-ebpf and pinned under the pin directory.
pub const MAP_SERVICES: &str = "LB_SERVICES_V2";
pub const MAP_BACKENDS: &str = "LB_BACKENDS_V2";
pub const MAP_REVNAT: &str = "LB_REVNAT_V2";
pub const MAP_SOCK_REVNAT: &str = "LB_SOCK_REVNAT_V2";
pub const MAP_AFFINITY: &str = "LB_AFFINITY_V1";
pub const MAP_AFFINITY_SRC: &str = "LB_AFFINITY_SRC_V1";
pub const MAP_COUNTERS: &str = "LB_COUNTERS_V5";
pub const MAP_CT: &str = "LB_CT_V1";
pub const MAP_IFACES: &str = "LB_IFACES_V3";
pub const MAP_SOURCE_RANGES: &str = "LB_SOURCE_RANGES_V1";
pub const MAP_DROPS: &str = "LB_DROPS_V2";
pub const MAP_CT_EVENTS: &str = "LB_CT_EVENTS_V1";
pub const MAP_FRAGS: &str = "LB_FRAGS_V1";
pub const MAP_FRONTEND_PORTS: &str = "LB_FRONTEND_PORTS_V1";
pub const MAP_NAMES: &str = "LB_NAMES_V1";
pub const MAP_SOCKS: &str = "LB_SOCKS_V1";
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V1";
/// Every map the agent pins.
pub const PINNED_MAPS: [&str; 17] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_REVNAT,
    MAP_SOCK_REVNAT,
    MAP_AFFINITY,
    MAP_AFFINITY_SRC,
    MAP_COUNTERS,
    MAP_CT,
    MAP_IFACES,
    MAP_SOURCE_RANGES,
    MAP_DROPS,
    MAP_NAMES,
    MAP_CT_EVENTS,
    MAP_FRAGS,
    MAP_FRONTEND_PORTS,
    MAP_SOCKS,
    MAP_MAGLEV,
];

/// Capacity of the maps as the object defines them; the agent sizes them at load
/// (`lb-user run --max-services` and friends; these are the defaults). The object
/// declares the services, backends, rev-NAT and names maps not preallocated, so their
/// capacity costs no memory, but the agent makes the services and backends maps
/// preallocated unless `--preallocate-maps=false`; the LRU maps (affinity, socket
/// rev-NAT, connection tracking) always are.
pub const MAX_SERVICE_ENTRIES: u32 = 262_144;
pub const MAX_BACKENDS: u32 = 262_144;
/// Frontends: rev-NAT ids are 16-bit and 0 is never used.
pub const MAX_REVNAT: u32 = 65_535;
pub const MAX_SOCK_REVNAT: u32 = 65_536;
pub const MAX_AFFINITY: u32 = 65_536;
/// Two entries a flow: 64k flows from outside the node (LRU).
pub const MAX_CT: u32 = 131_072;
pub const MAX_IFACES: u32 = 64;
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// Backends one frontend may list (slots 1..=MAX_SLOTS).
pub const MAX_SLOTS: u16 = 65_535;

/// Source ports the packet level SNATs to (externalTrafficPolicy Cluster, backend on
/// another node): above the kernel's default ephemeral range (32768-60999) and away from
/// nodePorts (30000-32767). The agent also reserves them (`ip_local_reserved_ports`) so
/// the host never binds one.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 63_999;
/// The last port of that range is not used for SNAT: a packet to an external frontend
/// without backends is sent to the node's own stack at this port, where nothing listens,
/// so the stack refuses it (TCP RST, ICMP port unreachable) and the refusal goes back
/// translated.
pub const REJECT_PORT: u16 = SNAT_PORT_MAX;

/// Connection-tracking idle timeouts (seconds): an entry not seen for longer is stale
/// and a packet of its tuple starts a new flow.
pub const CT_TCP_TIMEOUT_S: u64 = 6 * 3600;
/// A TCP flow after a RST, or a FIN each way.
pub const CT_TCP_CLOSING_TIMEOUT_S: u64 = 10;
/// A TCP flow not established yet (its client has sent nothing but SYNs): Cilium's SYN
/// timeout. A flood of SYNs that nobody completes gives its entries (and their SNAT
/// ports) back within this.
pub const CT_TCP_SYN_TIMEOUT_S: u64 = 60;
pub const CT_UDP_TIMEOUT_S: u64 = 60;
/// How long after a TCP flow closed (a FIN each way) its backend may still hold the
/// tuple in TIME_WAIT: Linux's 60 s, and a second for the last ACK. A SNAT port is not
/// given to a new flow to the same backend within this while another port is free: a
/// SYN from another client on a tuple in TIME_WAIT can get the old flow's ACK, which the
/// client resets before it sends its SYN again (Linux at once, other stacks after their
/// SYN timeout). Conntrack, for kube-proxy's masquerade, holds such tuples 120 s.
pub const CT_TCP_TIME_WAIT_S: u64 = 61;

/// TCP header flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An address of either family, as 16 network-order octets: IPv6 as is, IPv4 as the
/// IPv4-mapped IPv6 address `::ffff:a.b.c.d`. One map layout serves both families, and a
/// dual-stack IPv6 socket connecting to `::ffff:10.96.0.10` finds the IPv4 service.
pub type Addr = [u8; 16];

/// `::ffff:a.b.c.d` for an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped address, `None` for a real IPv6 address.
#[inline(always)]
pub fn as_v4(addr: &Addr) -> Option<[u8; 4]> {
    if is_v4_mapped(addr) {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// Whether `addr` is an IPv4-mapped address (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_v4_mapped(addr: &Addr) -> bool {
    let mut prefix = 0u8;
    let mut i = 0;
    while i < 10 {
        prefix |= addr[i];
        i += 1;
    }
    prefix == 0 && addr[10] == 0xff && addr[11] == 0xff
}

/// Key of the services map: one frontend (address, port, protocol, scope) and a slot.
/// Slot 0 is the header ([`ServiceValue::count`] etc.); slots `1..=count` each hold
/// one backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend address, network order octets (IPv4 mapped, see [`Addr`]).
    pub addr: Addr,
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

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16, proto: u8, slot: u16) -> Self {
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
    /// Header: id of the frontend in the rev-NAT map, also the service part of the
    /// affinity key. Host order.
    pub rev_nat_id: u16,
    /// Header: ClientIP affinity timeout in seconds, 0 = no affinity. Host order.
    pub affinity_timeout: u32,
    /// Header: `SVC_F_*` flags.
    pub flags: u8,
    /// Header: the frontend's affinity generation, new for every frontend the agent
    /// creates and whenever affinity is switched on; an affinity entry of another
    /// generation (a removed frontend's whose rev-NAT id was reused, or one from before
    /// affinity was last off) is never followed. 0 in maps of agents that predate it,
    /// which wrote entries with 0 too.
    pub epoch: u8,
    pub _pad: [u8; 2],
}

/// `ServiceValue::flags` (header): the frontend accepts clients from its source ranges
/// only (`loadBalancerSourceRanges`, in the source-ranges map under its rev-NAT id).
pub const SVC_F_SOURCE_RANGES: u8 = 1;
/// `ServiceValue::flags` (header, count 0): the service has endpoints, but its traffic
/// policy is Local and none is on this node (kube-proxy drops such traffic; we refuse
/// with EHOSTUNREACH, where a service without endpoints gets ECONNREFUSED).
pub const SVC_F_NO_LOCAL: u8 = 2;

impl ServiceValue {
    pub const fn header(count: u16, rev_nat_id: u16, affinity_timeout: u32) -> Self {
        Self {
            backend_id: 0,
            count,
            rev_nat_id,
            affinity_timeout,
            flags: 0,
            epoch: 0,
            _pad: [0; 2],
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            rev_nat_id: 0,
            affinity_timeout: 0,
            flags: 0,
            epoch: 0,
            _pad: [0; 2],
        }
    }
}

/// Value of the backends map (key: backend id, `u32`, host order; 0 is never used).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Backend (pod) address, network order octets (IPv4 mapped, see [`Addr`]).
    pub addr: Addr,
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
pub struct RevNat {
    /// Frontend address, network order octets (IPv4 mapped).
    pub addr: Addr,
    /// Frontend port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Value of the names map (key: rev-NAT id, `u16`): the Service port a frontend belongs
/// to, `namespace/name:port-name`, for `lb-user dump` (the programs never read it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrontendName {
    /// Bytes of `name` in use.
    pub len: u8,
    /// `FRONTEND_*`: what kind of address the frontend is.
    pub kind: u8,
    /// `FRONTEND_F_*`.
    pub flags: u8,
    pub _pad: [u8; 5],
    /// UTF-8, cut at a character boundary when longer.
    pub name: [u8; 128],
}

/// `FrontendName::kind`.
pub const FRONTEND_CLUSTER_IP: u8 = 1;
pub const FRONTEND_NODE_PORT: u8 = 2;
pub const FRONTEND_EXTERNAL_IP: u8 = 3;
pub const FRONTEND_LOAD_BALANCER: u8 = 4;
/// `FrontendName::flags`: the traffic policy that applies to it (internal for a cluster
/// IP, external for the others) is Local.
pub const FRONTEND_F_POLICY_LOCAL: u8 = 1;
/// `FrontendName::flags`: the Service keeps its clients' sockets when a backend leaves
/// (`lb-user.dev/keep-sockets`). Kept in the map so that an agent that reads the maps
/// back (a restart, a failed write) and finds the Service gone still knows it.
pub const FRONTEND_F_KEEP_SOCKETS: u8 = 2;

impl FrontendName {
    pub fn new(text: &str) -> Self {
        let mut end = text.len().min(128);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut name = [0u8; 128];
        name[..end].copy_from_slice(&text.as_bytes()[..end]);
        Self {
            len: end as u8,
            kind: 0,
            flags: 0,
            _pad: [0; 5],
            name,
        }
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.name[..usize::from(self.len).min(128)]).unwrap_or("?")
    }
}

/// Key of the socket rev-NAT map (LRU): a translated socket and the backend it talks to.
/// The value is the [`RevNat`] frontend that getpeername() and recvmsg() report.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()`, host order.
    pub cookie: u64,
    /// Backend address, network order octets (IPv4 mapped).
    pub addr: Addr,
    /// Backend port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Frontends one socket's record ([`SockRecord`]) holds: the services an unconnected UDP
/// socket talks to at once (a resolver's one or two), or the one a connected socket has.
pub const SOCK_FRONTENDS: usize = 4;

/// One frontend a socket was translated for: the backend it sticks to and the key of
/// its socket rev-NAT entry. `rev_nat_id` 0 is an unused entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SockFrontend {
    /// Backend address, network order octets (IPv4 mapped), as in [`SockRevNatKey`].
    pub addr: Addr,
    /// Backend port, host order.
    pub port: u16,
    /// The frontend's rev-NAT id, host order.
    pub rev_nat_id: u16,
    /// The backend's id, host order (never reused for another backend).
    pub backend_id: u32,
    /// The frontend's slot the backend was found in (0: not known), host order.
    pub slot: u16,
    pub _pad: [u8; 2],
}

/// Value of the sockets map (LRU; key: the socket cookie, `u64`): the frontends a socket
/// was translated for. sendmsg() keeps an unconnected UDP socket on its backend through
/// it, and the socket's release deletes the socket rev-NAT entries it lists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRecord {
    pub frontends: [SockFrontend; SOCK_FRONTENDS],
}

/// Key of the ClientIP affinity map (LRU): a client and a frontend. At socket level the
/// source address is not chosen yet at connect(), so the client is its network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie()` of the calling socket, host order.
    pub netns_cookie: u64,
    /// The frontend's rev-NAT id, host order.
    pub rev_nat_id: u16,
    pub _pad: [u8; 6],
}

/// The data of a source-ranges key (an LPM trie; the key is this behind a `u32` prefix
/// length in bits): a frontend's rev-NAT id, then a client address. An entry's prefix
/// length is 32 (id and padding, always matched whole) plus the range's prefix on the
/// 128-bit address (an IPv4 /n is 96 + n on the mapped address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRange {
    /// The frontend's rev-NAT id, network order (so that it is the key's first bits).
    pub rev_nat_id_be: u16,
    pub _pad: [u8; 2],
    /// Network order octets (IPv4 mapped).
    pub addr: Addr,
}

impl SourceRange {
    /// The prefix length of a range of `addr_bits` bits on the 128-bit address.
    pub const fn prefix_len(addr_bits: u8) -> u32 {
        32 + addr_bits as u32
    }
}

/// Key of the packet level's ClientIP affinity map (LRU): a client by its source address
/// (what kube-proxy keys affinity by) and a frontend. The value is an [`AffinityValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SrcAffinityKey {
    /// The client's address, network order octets (IPv4 mapped).
    pub addr: Addr,
    /// The frontend's rev-NAT id, host order.
    pub rev_nat_id: u16,
    pub _pad: [u8; 6],
}

/// Value of the affinity map: the backend the client was sent to and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    /// Backend id, host order.
    pub backend_id: u32,
    /// The frontend header's `epoch` when the entry was written.
    pub epoch: u8,
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_ns()` of the last connection that used the entry.
    pub last_used_ns: u64,
}

/// Key of the connection-tracking map (LRU): a packet's tuple as it arrives, before any
/// translation. A translated flow has two entries: the original direction (client to
/// frontend) and the reply direction (backend to client, or to the node's SNAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct CtKey {
    /// Source and destination addresses, network order octets (IPv4 mapped).
    pub saddr: Addr,
    pub daddr: Addr,
    /// Source and destination ports, host order.
    pub sport: u16,
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the connection-tracking map: the tuple the packet is rewritten to, and the
/// flow's state. The tuple of the other direction follows from it (see
/// [`CtValue::partner`]), so a half evicted from the LRU is rebuilt from the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtValue {
    /// The new source and destination, network order octets (IPv4 mapped).
    pub saddr: Addr,
    pub daddr: Addr,
    /// The new source and destination ports, host order.
    pub sport: u16,
    pub dport: u16,
    /// The backend the flow was sent to, host order.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` when a packet of the flow was last seen (updated at most
    /// once a second).
    pub last_seen_ns: u64,
    /// `CT_F_*`.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// `CtValue::flags`: this entry is the reply direction.
pub const CT_F_REPLY: u8 = 1;
/// The flow is source-NATed to the node (backend on another node).
pub const CT_F_SNAT: u8 = 2;
/// A TCP RST, or a FIN each way, was seen: the entry expires after
/// `CT_TCP_CLOSING_TIMEOUT_S`.
pub const CT_F_CLOSING: u8 = 4;
/// A flow to a frontend without backends, sent to the node's stack at `REJECT_PORT`
/// to be refused there.
pub const CT_F_REJECT: u8 = 8;
/// A TCP flow whose client has sent only SYNs so far: `CT_TCP_SYN_TIMEOUT_S`. Set
/// when a bare SYN creates the flow, cleared by the client's first packet without SYN.
/// (Entries written before this flag existed lack it: established, as they were.)
pub const CT_F_SYN_SENT: u8 = 16;
/// A FIN from the flow's client, from its backend: a direction each (both halves carry
/// both bits); the flow is closing once it has both. A half-closed flow lives on.
pub const CT_F_FIN_ORIG: u8 = 32;
pub const CT_F_FIN_REPLY: u8 = 64;
/// The bits that only ever get set while a flow lives (a flow's halves are merged by
/// union of these).
const CT_F_STICKY: u8 = CT_F_CLOSING | CT_F_FIN_ORIG | CT_F_FIN_REPLY;

impl CtValue {
    /// The other direction's entry, for the packet `key` that this value translates:
    /// a packet from the new destination to the new source is rewritten to come from
    /// `key`'s destination and go to `key`'s source.
    #[inline(always)]
    pub fn partner(&self, key: &CtKey) -> (CtKey, CtValue) {
        let mut k = CtKey::zeroed();
        let mut v = CtValue::zeroed();
        self.write_partner(key, &mut k, &mut v);
        (k, v)
    }

    /// [`CtValue::partner`], written in place (the eBPF stack is small).
    #[inline(always)]
    pub fn write_partner(&self, key: &CtKey, k: &mut CtKey, v: &mut CtValue) {
        k.saddr = self.daddr;
        k.daddr = self.saddr;
        k.sport = self.dport;
        k.dport = self.sport;
        k.proto = key.proto;
        k._pad = [0; 3];
        v.saddr = key.daddr;
        v.daddr = key.saddr;
        v.sport = key.dport;
        v.dport = key.sport;
        v.backend_id = self.backend_id;
        v.last_seen_ns = self.last_seen_ns;
        v.flags = self.flags ^ CT_F_REPLY;
        v._pad = [0; 7];
    }

    /// Whether this entry, at key `key`, is the other half of the entry at `partner_key`:
    /// its tuple is the reverse of that key's. A half whose other half's tuple is held by
    /// an entry that does not name it back belongs to a flow that lost its other half
    /// (evicted, then taken by another flow): it must never be used.
    #[inline(always)]
    pub fn names(&self, partner_key: &CtKey) -> bool {
        self.saddr == partner_key.daddr
            && self.daddr == partner_key.saddr
            && self.sport == partner_key.dport
            && self.dport == partner_key.sport
    }

    /// The flags of an entry after a packet with TCP flags `tcp` went its way
    /// (`CT_F_*`): a RST closes the flow, a FIN marks its direction and closes it once
    /// both directions sent one, and the client's first packet without SYN establishes it.
    #[inline(always)]
    pub const fn flags_after(flags: u8, proto: u8, tcp: u8) -> u8 {
        if proto != PROTO_TCP {
            return flags;
        }
        let mut f = flags;
        if tcp & TCP_RST != 0 {
            f |= CT_F_CLOSING;
        }
        if tcp & TCP_FIN != 0 {
            f |= if f & CT_F_REPLY != 0 {
                CT_F_FIN_REPLY
            } else {
                CT_F_FIN_ORIG
            };
        }
        if f & (CT_F_FIN_ORIG | CT_F_FIN_REPLY) == CT_F_FIN_ORIG | CT_F_FIN_REPLY {
            f |= CT_F_CLOSING;
        }
        if f & CT_F_REPLY == 0 && tcp & (TCP_SYN | TCP_RST) == 0 && tcp & TCP_ACK != 0 {
            f &= !CT_F_SYN_SENT;
        }
        f
    }

    /// The flags a flow's new entry starts with (`base`: its kind) for its first packet's
    /// TCP flags: a bare SYN starts it unestablished.
    #[inline(always)]
    pub const fn flags_new(base: u8, proto: u8, tcp: u8) -> u8 {
        if proto == PROTO_TCP && tcp & (TCP_SYN | TCP_ACK) == TCP_SYN {
            base | CT_F_SYN_SENT
        } else {
            base
        }
    }

    /// The flags to write to the other half (whose flags are `theirs`) when this half's
    /// flags are `mine`: the sticky state of both (FINs, closing), unestablished only
    /// while both say so. A change one CPU writes is never undone by another's refresh.
    #[inline(always)]
    pub const fn merged_for_partner(mine: u8, theirs: u8) -> u8 {
        let sticky = (mine | theirs) & CT_F_STICKY;
        let syn = mine & theirs & CT_F_SYN_SENT;
        (theirs & !(CT_F_STICKY | CT_F_SYN_SENT)) | sticky | syn
    }

    /// Whether the entry is stale at `now_ns`. An entry seen "after" `now_ns` was just
    /// refreshed by another CPU (whose clock read came later): live.
    #[inline(always)]
    pub const fn expired(&self, proto: u8, now_ns: u64) -> bool {
        let timeout_s = if proto == PROTO_UDP {
            CT_UDP_TIMEOUT_S
        } else if self.flags & CT_F_CLOSING != 0 {
            CT_TCP_CLOSING_TIMEOUT_S
        } else if self.flags & CT_F_SYN_SENT != 0 {
            CT_TCP_SYN_TIMEOUT_S
        } else {
            CT_TCP_TIMEOUT_S
        };
        now_ns.saturating_sub(self.last_seen_ns) > timeout_s * 1_000_000_000
    }

    /// Whether the entry is of a TCP flow that closed with a FIN each way at most
    /// `CT_TCP_TIME_WAIT_S` before `now_ns`: the side that closed first (the backend,
    /// for a reply half's tuple) may still hold the tuple in TIME_WAIT.
    #[inline(always)]
    pub const fn in_time_wait(&self, proto: u8, now_ns: u64) -> bool {
        let fins = CT_F_FIN_ORIG | CT_F_FIN_REPLY;
        proto == PROTO_TCP
            && self.flags & fins == fins
            && now_ns.saturating_sub(self.last_seen_ns) <= CT_TCP_TIME_WAIT_S * 1_000_000_000
    }
}

/// Value of the interfaces map (key: ifindex, `u32`, host order): what the packet
/// level (tc and XDP) needs to know of an interface it is attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PacketIface {
    /// The node's IPv4 address on the interface, the SNAT source of IPv4 flows (IPv4
    /// mapped; all zero when it has none).
    pub addr4: Addr,
    /// The node's IPv6 address there, the SNAT source of IPv6 flows (all zero: none).
    pub addr6: Addr,
}

/// Whether an affinity entry last used at `last_used_ns` still holds at `now_ns` for a
/// timeout of `timeout_s` seconds (kube-proxy: the entry lives `timeoutSeconds` after
/// the last packet; here, after the last connect or datagram).
#[inline(always)]
pub const fn affinity_valid(last_used_ns: u64, now_ns: u64, timeout_s: u32) -> bool {
    timeout_s != 0
        && now_ns >= last_used_ns
        && now_ns - last_used_ns <= timeout_s as u64 * 1_000_000_000
}

/// The Internet checksum `old` (as stored in the packet) after `size` bytes (2 or 4)
/// of what it covers changed from `from` to `to` (loaded from the packet as native
/// integers, like `old`): RFC 1624's incremental update `~(~HC + ~m + m')`. What the
/// kernel's `bpf_l3_csum_replace` / `bpf_l4_csum_replace` do to the field, for the
/// hook that has no such helpers (XDP).
#[inline(always)]
pub const fn csum_replace(old: u16, from: u32, to: u32, size: u8) -> u16 {
    let mut sum = !old as u32;
    if size == 4 {
        let f = !from;
        sum += (f & 0xffff) + (f >> 16) + (to & 0xffff) + (to >> 16);
    } else {
        sum += (!(from as u16)) as u32 + (to as u16) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
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
    /// rev-NAT or affinity map full, a backend of the other family).
    pub misses: u64,
    /// Connections or datagrams refused because the service's endpoints are all on
    /// other nodes while its traffic policy is Local (`SVC_F_NO_LOCAL`).
    pub no_local: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.translated += other.translated;
        self.no_local += other.no_local;
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
pub const PROG_CONNECT6: u32 = 4;
pub const PROG_SENDMSG6: u32 = 5;
pub const PROG_RECVMSG6: u32 = 6;
pub const PROG_GETPEERNAME6: u32 = 7;
pub const PROG_TC_INGRESS: u32 = 8;
pub const PROG_TC_EGRESS: u32 = 9;
pub const PROG_XDP: u32 = 10;
/// Names of the programs by counter index.
pub const PROG_NAMES: [&str; 11] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
    "tc_ingress",
    "tc_egress",
    "xdp",
];

/// Why the packet level (tc or XDP) dropped a packet: indexes of the drops map (a per-CPU count each).
/// The packet could not be rewritten (shorter than its headers say, a helper failed).
pub const DROP_REWRITE: u32 = 0;
/// A new SNAT flow found no free port in the SNAT range, or the CT map refused it.
pub const DROP_NO_SNAT_PORT: u32 = 1;
/// A SNATed packet larger than the way to its backend allows.
pub const DROP_SNAT_TOO_BIG: u32 = 2;
/// A SNATed packet whose backend is the node itself (host network).
pub const DROP_SNAT_LOCAL: u32 = 3;
/// The interface has no address of the packet's family to SNAT or refuse from.
pub const DROP_NO_NODE_ADDR: u32 = 4;
/// The choice found no backend (a slot or backend entry missing: a sync in progress).
pub const DROP_NO_BACKEND: u32 = 5;
/// loadBalancerSourceRanges: the client is in none of the ranges.
pub const DROP_SOURCE_RANGE: u32 = 6;
/// externalTrafficPolicy Local and no endpoint on this node.
pub const DROP_NO_LOCAL_ENDPOINT: u32 = 7;
/// No route to the backend (the FIB lookup failed), or the redirect failed.
pub const DROP_NO_ROUTE: u32 = 8;
/// The CT map refused a new flow's entry for another reason than a taken port (the
/// kernel's error: no memory, a lock it could not take).
pub const DROP_CT_REFUSED: u32 = 9;
/// A new flow's reply tuple is held by another live flow (the same client port sent to
/// two frontends of one backend): never overwritten.
pub const DROP_CT_TUPLE_TAKEN: u32 = 10;
/// A packet the node would forward with a TTL (hop limit) of 1: answered with time
/// exceeded (IPv4 client flows) or dropped.
pub const DROP_TTL_EXCEEDED: u32 = 11;
/// Names of the drop reasons by index (metrics labels, `lb-user dump`).
pub const DROP_REASONS: [&str; 12] = [
    "rewrite_failed",
    "no_snat_port",
    "snat_too_big",
    "snat_to_host",
    "no_node_address",
    "no_backend",
    "source_range",
    "no_local_endpoint",
    "no_route",
    "ct_refused",
    "ct_tuple_taken",
    "ttl_exceeded",
];

/// Connection-tracking events the packet level counts (indexes of `LB_CT_EVENTS_V1`, a
/// per-CPU count each): what happened to flows besides drops.
/// A missing half of a flow rebuilt from the other (after an LRU eviction).
pub const CT_EV_REBUILT: u32 = 0;
/// A half whose other half's tuple now belongs to another flow: removed, never used.
pub const CT_EV_ORPHAN_REMOVED: u32 = 1;
/// Rebuilding a missing half failed (the kernel refused the insert, or another flow
/// took the tuple meanwhile).
pub const CT_EV_REBUILD_FAILED: u32 = 2;
/// A new flow took a tuple (a SNAT port) held by a flow that had ended.
pub const CT_EV_PORT_RECLAIMED: u32 = 3;
/// Every SNAT port tried was held by a live flow: the new flow took the port of the
/// oldest unestablished one among them (a SYN flood's), which was removed.
pub const CT_EV_SYN_EVICTED: u32 = 4;
/// A later IPv4 fragment whose first fragment was not seen (or not ours): passed on.
pub const CT_EV_FRAG_UNKNOWN: u32 = 5;
/// Later fragments translated as their first fragment's flow.
pub const CT_EV_FRAG_TRANSLATED: u32 = 6;
/// An IPv6 packet with a fragment header: not translated (passed on).
pub const CT_EV_FRAG6_PASSED: u32 = 7;
pub const CT_EVENTS: [&str; 8] = [
    "partner_rebuilt",
    "orphan_removed",
    "rebuild_failed",
    "port_reclaimed",
    "syn_evicted",
    "frag_unknown",
    "frag_translated",
    "frag6_passed",
];

/// Key of the IPv4 fragments map (LRU): what every fragment of one datagram shares.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    /// Source and destination as they arrived (IPv4 mapped).
    pub saddr: Addr,
    pub daddr: Addr,
    /// The IP identification, network order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the ports of the datagram's first fragment, network
/// order (as in the packet), and when it was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
    /// `bpf_ktime_get_ns()` of the first fragment, in seconds (wraps after 136 years).
    pub seen_s: u32,
}

/// How long a first fragment's ports serve its later fragments (the kernel's
/// `ipfrag_time`): an entry older than this belongs to an earlier datagram that had the
/// same IP id (a busy source), never to this one.
pub const FRAG_TIMEOUT_S: u32 = 30;

/// Key of the frontend-ports map: an address, port and protocol that some frontend has
/// (whatever its scope), the packet level's first check of whether a packet may be ours.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FrontendPort {
    /// Network order octets (IPv4 mapped).
    pub addr: Addr,
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Capacity of the fragments map (datagrams in flight; Cilium's default).
pub const MAX_FRAGS: u32 = 8192;

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

/// The Maglev tables (`--lb-algorithm maglev`): the outer map (hash of maps) takes a
/// frontend's header key (slot 0, either scope) to its table, an array of `u64`
/// elements: element 0 holds the table size `M` (low 32 bits), element 1 a fingerprint
/// of what the table was built from (the agent's, to adopt tables after a restart),
/// and elements `MAGLEV_HEAD..` the `M` backend ids, two per element (entry `2k` in the
/// low 32 bits, `2k + 1` in the high ones): `M * 4` bytes per table.
pub const MAGLEV_HEAD: u32 = 2;
/// `BPF_F_INNER_MAP`: tables of any size fit the outer map (kernel 5.10+).
pub const MAGLEV_INNER_FLAGS: u32 = 1 << 12;

/// Elements of a table of `m` entries (see [`MAGLEV_HEAD`]).
pub const fn maglev_elements(m: u32) -> u32 {
    MAGLEV_HEAD + m.div_ceil(2)
}

/// Where entry `hash % m` of a table of `m` entries is: its element and whether it is
/// the element's high half. `None` for an empty table.
#[inline(always)]
pub const fn maglev_entry(hash: u32, m: u32) -> Option<(u32, bool)> {
    if m == 0 {
        return None;
    }
    let i = hash % m;
    Some((MAGLEV_HEAD + i / 2, i & 1 == 1))
}

/// The backend id of one half of a table element.
#[inline(always)]
pub const fn maglev_half(element: u64, high: bool) -> u32 {
    if high {
        (element >> 32) as u32
    } else {
        element as u32
    }
}

/// The fixed hash of a flow's 5-tuple (addresses as in [`CtKey`], ports host order)
/// that indexes a Maglev table: murmur3's 32-bit mixing over the addresses' words, the
/// ports and the protocol. The same in the programs and the agent, on every node, so
/// two nodes behind one load balancer choose the same entry for a flow (the
/// destination is the frontend, not the node).
#[inline(always)]
pub const fn flow_hash(saddr: &Addr, daddr: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x6c62_6d67; // "lbmg"
    let mut i = 0;
    while i < 16 {
        h = murmur_round(h, le_word(saddr, i));
        i += 4;
    }
    let mut i = 0;
    while i < 16 {
        h = murmur_round(h, le_word(daddr, i));
        i += 4;
    }
    h = murmur_round(h, ((sport as u32) << 16) | dport as u32);
    h = murmur_round(h, proto as u32);
    // murmur3's finaliser, after the length (37 bytes) as it mixes it in.
    h ^= 37;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn le_word(a: &Addr, i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

#[inline(always)]
const fn murmur_round(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 24);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<RevNat>() == 20);
    assert!(core::mem::size_of::<SockRevNatKey>() == 32);
    assert!(core::mem::size_of::<SockFrontend>() == 28);
    assert!(core::mem::size_of::<SockRecord>() == 28 * SOCK_FRONTENDS);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<Counters>() == 40);
    assert!(core::mem::size_of::<SrcAffinityKey>() == 24);
    assert!(core::mem::size_of::<SourceRange>() == 20);
    assert!(core::mem::size_of::<CtKey>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 56);
    assert!(core::mem::size_of::<FragKey>() == 36);
    assert!(core::mem::size_of::<FragValue>() == 8);
    assert!(core::mem::size_of::<FrontendPort>() == 20);
    assert!(core::mem::size_of::<PacketIface>() == 32);
    assert!(SNAT_PORT_MIN > 60_999 && SNAT_PORT_MIN <= SNAT_PORT_MAX);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `bytemuck::Pod`: plain old data without padding.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::SrcAffinityKey {}
    unsafe impl aya::Pod for super::SourceRange {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::FrontendPort {}
    unsafe impl aya::Pod for super::PacketIface {}
    unsafe impl aya::Pod for super::FrontendName {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_names_are_cut_at_a_character_boundary() {
        assert_eq!(FrontendName::new("ns/web:http").as_str(), "ns/web:http");
        // "x" and 70 two-byte "é": 141 bytes; 128 would split an "é".
        let mut long = [0u8; 141];
        long[0] = b'x';
        for pair in long[1..].chunks_mut(2) {
            pair.copy_from_slice("é".as_bytes());
        }
        let long = core::str::from_utf8(&long).unwrap();
        assert_eq!(FrontendName::new(long).as_str(), &long[..127]);
        assert_eq!(core::mem::size_of::<FrontendName>(), 136);
    }

    #[test]
    fn key_bytes_are_wire_address_then_host_port() {
        let key = ServiceKey::new(v4_mapped([10, 96, 0, 10]), 80, PROTO_TCP, 2);
        let bytes = bytemuck::bytes_of(&key);
        assert_eq!(
            &bytes[0..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 96, 0, 10]
        );
        assert_eq!(&bytes[16..18], &80u16.to_ne_bytes());
        assert_eq!(bytes[18], PROTO_TCP);
        assert_eq!(bytes[19], SCOPE_EXTERNAL);
        assert_eq!(&bytes[20..22], &2u16.to_ne_bytes());
        assert_eq!(&bytes[22..24], &[0, 0]);
    }

    #[test]
    fn v4_mapped_round_trips_and_real_v6_is_not_v4() {
        let a = v4_mapped([192, 0, 2, 1]);
        assert_eq!(as_v4(&a), Some([192, 0, 2, 1]));
        // Same octets as std's to_ipv6_mapped.
        let std_mapped = core::net::Ipv4Addr::new(192, 0, 2, 1)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(a, std_mapped);
        let v6: Addr = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(as_v4(&v6), None);
        // ::1 and the IPv4-compatible ::a.b.c.d are not mapped addresses.
        let mut loopback6 = [0u8; 16];
        loopback6[15] = 1;
        assert_eq!(as_v4(&loopback6), None);
    }

    #[test]
    fn affinity_expires_after_the_timeout_and_zero_means_off() {
        let s = 1_000_000_000u64;
        assert!(affinity_valid(10 * s, 10 * s, 1));
        assert!(affinity_valid(10 * s, 11 * s, 1));
        assert!(!affinity_valid(10 * s, 11 * s + 1, 1));
        assert!(!affinity_valid(10 * s, 10 * s, 0));
        // A clock that went backwards (an entry from the future) is not trusted.
        assert!(!affinity_valid(11 * s, 10 * s, 5));
        // 86400 s in ns does not overflow.
        assert!(affinity_valid(0, 86_400 * s, 86_400));
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
    fn ct_partner_of_a_snat_flow_is_the_reply_and_back() {
        let client = v4_mapped([192, 168, 77, 100]);
        let node = v4_mapped([192, 168, 77, 1]);
        let pod = v4_mapped([10, 244, 101, 2]);
        // Client to the nodePort, rewritten to node:snat -> pod:8080.
        let key = CtKey {
            saddr: client,
            daddr: node,
            sport: 40000,
            dport: 30080,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let value = CtValue {
            saddr: node,
            daddr: pod,
            sport: 61_234,
            dport: 8080,
            backend_id: 7,
            last_seen_ns: 5,
            flags: CT_F_SNAT,
            _pad: [0; 7],
        };
        let (rk, rv) = value.partner(&key);
        // The reply pod:8080 -> node:61234 becomes node:30080 -> client:40000.
        assert_eq!(
            (rk.saddr, rk.sport, rk.daddr, rk.dport),
            (pod, 8080, node, 61_234)
        );
        assert_eq!(
            (rv.saddr, rv.sport, rv.daddr, rv.dport),
            (node, 30080, client, 40000)
        );
        assert_eq!(rv.flags, CT_F_SNAT | CT_F_REPLY);
        assert_eq!(rv.backend_id, 7);
        // And the partner of the reply is the original entry again.
        assert_eq!(rv.partner(&rk), (key, value));
    }

    #[test]
    fn ct_entries_expire_by_protocol_and_state() {
        let s = 1_000_000_000u64;
        let mut v = CtValue::zeroed();
        v.last_seen_ns = 100 * s;
        assert!(!v.expired(PROTO_UDP, 100 * s + CT_UDP_TIMEOUT_S * s));
        assert!(v.expired(PROTO_UDP, 100 * s + CT_UDP_TIMEOUT_S * s + 1));
        assert!(!v.expired(PROTO_TCP, 100 * s + 3600 * s));
        v.flags = CT_F_CLOSING;
        assert!(v.expired(PROTO_TCP, 100 * s + 11 * s));
        // Refreshed by another CPU after our clock read: live.
        assert!(!v.expired(PROTO_TCP, 99 * s));
    }

    #[test]
    fn a_tcp_flow_closed_with_a_fin_each_way_is_in_time_wait_for_a_minute() {
        let s = 1_000_000_000u64;
        let mut v = CtValue::zeroed();
        v.last_seen_ns = 100 * s;
        v.flags = CT_F_SNAT | CT_F_REPLY | CT_F_CLOSING | CT_F_FIN_ORIG | CT_F_FIN_REPLY;
        // Stale for its own tuple after 10 s, still waiting for the backend's.
        assert!(v.expired(PROTO_TCP, 111 * s));
        assert!(v.in_time_wait(PROTO_TCP, 111 * s));
        assert!(v.in_time_wait(PROTO_TCP, 100 * s + CT_TCP_TIME_WAIT_S * s));
        assert!(!v.in_time_wait(PROTO_TCP, 100 * s + CT_TCP_TIME_WAIT_S * s + 1));
        // Not UDP; not a flow reset (no TIME_WAIT), nor one half-closed.
        assert!(!v.in_time_wait(PROTO_UDP, 111 * s));
        v.flags = CT_F_SNAT | CT_F_CLOSING;
        assert!(!v.in_time_wait(PROTO_TCP, 111 * s));
        v.flags = CT_F_SNAT | CT_F_FIN_REPLY;
        assert!(!v.in_time_wait(PROTO_TCP, 111 * s));
    }

    #[test]
    fn with_slot_keeps_frontend() {
        let k = ServiceKey::new(v4_mapped([1, 2, 3, 4]), 53, PROTO_UDP, 0);
        let s = k.with_slot(7);
        assert_eq!(
            (s.addr, s.port, s.proto, s.slot),
            (v4_mapped([1, 2, 3, 4]), 53, PROTO_UDP, 7)
        );
    }

    /// The Internet checksum of `data` (16-bit words as the packet holds them, read
    /// as native integers as the programs load them).
    fn full_csum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|w| u32::from(u16::from_ne_bytes([w[0], w[1]])))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn an_incremental_checksum_update_equals_checksumming_anew() {
        // An IPv4 header's worth of bytes, then an address (4 bytes, as the programs
        // rewrite one) and a port (2 bytes) changed, over many values (a fixed LCG).
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed
        };
        for _ in 0..10_000 {
            let mut data = [0u8; 20];
            for b in &mut data {
                *b = next() as u8;
            }
            // The checksum field counts as 0 while the checksum is computed.
            data[10..12].fill(0);
            let mut sum = full_csum(&data);
            let old4 = u32::from_ne_bytes(data[12..16].try_into().unwrap());
            let new4 = next();
            data[12..16].copy_from_slice(&new4.to_ne_bytes());
            sum = csum_replace(sum, old4, new4, 4);
            let old2 = u16::from_ne_bytes([data[2], data[3]]);
            let new2 = next() as u16;
            data[2..4].copy_from_slice(&new2.to_ne_bytes());
            sum = csum_replace(sum, u32::from(old2), u32::from(new2), 2);
            let want = full_csum(&data);
            // 0 and 0xffff are the same one's complement number.
            assert!(
                sum == want || sum ^ want == 0xffff && (sum == 0 || want == 0),
                "{data:?}: {sum:#x} != {want:#x}"
            );
            // A packet checksummed with the result checks out: it sums to zero.
            data[10..12].copy_from_slice(&sum.to_ne_bytes());
            let check = full_csum(&data);
            assert!(check == 0 || check == 0xffff, "{data:?}: {check:#x}");
        }
    }

    #[test]
    fn a_checksum_known_from_the_wire_is_updated_as_the_kernel_would() {
        // 192.168.0.1 -> 192.168.0.199, TTL 64, UDP, header checksum 0xb861 (the
        // textbook example); the destination becomes 10.0.0.2.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(full_csum(&hdr), 0);
        let old = u16::from_ne_bytes([hdr[10], hdr[11]]);
        let from = u32::from_ne_bytes([0xc0, 0xa8, 0x00, 0xc7]);
        let to = u32::from_ne_bytes([10, 0, 0, 2]);
        hdr[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let new = csum_replace(old, from, to, 4);
        hdr[10..12].copy_from_slice(&new.to_ne_bytes());
        assert_eq!(full_csum(&hdr), 0, "{hdr:x?}");
    }

    #[test]
    fn the_flow_hash_is_fixed_and_spreads_flows_over_a_table() {
        let client = v4_mapped([192, 0, 2, 7]);
        let vip = v4_mapped([198, 51, 100, 10]);
        // Pinned: the programs and every agent compute the same value.
        assert_eq!(
            flow_hash(&client, &vip, 40_000, 80, PROTO_TCP),
            PINNED_FLOW_HASH
        );
        // Every field counts.
        let h = flow_hash(&client, &vip, 40_000, 80, PROTO_TCP);
        assert_ne!(h, flow_hash(&vip, &client, 40_000, 80, PROTO_TCP));
        assert_ne!(h, flow_hash(&client, &vip, 40_001, 80, PROTO_TCP));
        assert_ne!(h, flow_hash(&client, &vip, 40_000, 81, PROTO_TCP));
        assert_ne!(h, flow_hash(&client, &vip, 40_000, 80, PROTO_UDP));
        // Source ports in a row spread evenly over the entries of a small table.
        let m = 251;
        let mut hits = [0u32; 251];
        for sport in 0..25_100u16 {
            let (e, high) =
                maglev_entry(flow_hash(&client, &vip, sport, 80, PROTO_UDP), m).expect("a table");
            hits[((e - MAGLEV_HEAD) * 2 + u32::from(high)) as usize] += 1;
        }
        assert!(hits.iter().all(|&n| (50..=150).contains(&n)), "{hits:?}");
    }

    #[test]
    fn maglev_entries_are_two_per_element_after_the_head() {
        assert_eq!(maglev_elements(16381), MAGLEV_HEAD + 8191);
        assert_eq!(maglev_elements(2), MAGLEV_HEAD + 1);
        assert_eq!(maglev_entry(7, 0), None);
        assert_eq!(maglev_entry(0, 251), Some((MAGLEV_HEAD, false)));
        assert_eq!(maglev_entry(251 + 3, 251), Some((MAGLEV_HEAD + 1, true)));
        assert_eq!(maglev_entry(250, 251), Some((MAGLEV_HEAD + 125, false)));
        let element = (9u64 << 32) | 4;
        assert_eq!(maglev_half(element, false), 4);
        assert_eq!(maglev_half(element, true), 9);
    }

    /// `flow_hash` of the test's flow when this was written.
    const PINNED_FLOW_HASH: u32 = 3_338_352_281;
}
