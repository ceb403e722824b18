//! Every map the programs use. The static's name is the map's name in the object, in
//! `bpftool` and under the agent's pin path: keep them here, and keep them stable (a
//! layout change gets a new `_Vn` name).

use crate::nat::Packet;
use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CT_EVENTS, Counters, CtKey, CtValue, DROP_REASONS,
    FragKey, FragValue, FrontendName, FrontendPort, MAGLEV_INNER_FLAGS, MAX_AFFINITY, MAX_BACKENDS,
    MAX_CT, MAX_FRAGS, MAX_IFACES, MAX_REVNAT, MAX_SERVICE_ENTRIES, MAX_SOCK_REVNAT,
    MAX_SOURCE_RANGES, PROG_NAMES, PacketIface, RevNat, ServiceKey, ServiceValue, SockRecord,
    SockRevNatKey, SourceRange, SrcAffinityKey,
};

/// Frontend (address, port, protocol, scope, slot) -> header (slot 0) or backend id.
/// Declared not preallocated (flag 1, `BPF_F_NO_PREALLOC`), like the other maps the agent
/// fills: their memory follows what is programmed, their capacity is a limit set by flags.
/// The agent makes this one and the backends map preallocated before the load unless
/// `--preallocate-maps=false` (`lb-user`'s `datapath::prealloc`).
#[btf_map]
pub(crate) static LB_SERVICES_V2: HashMap<
    ServiceKey,
    ServiceValue,
    { MAX_SERVICE_ENTRIES as usize },
    1,
> = HashMap::new();

/// Backend id -> pod address and port. Declared not preallocated; made preallocated by
/// the agent as the services map is.
#[btf_map]
pub(crate) static LB_BACKENDS_V2: HashMap<u32, Backend, { MAX_BACKENDS as usize }, 1> =
    HashMap::new();

/// A frontend's header key (slot 0, either scope) -> its Maglev table
/// (`--lb-algorithm maglev`, external frontends only; layout in `lb_common::MAGLEV_HEAD`).
/// The inner template is a one-element array with `BPF_F_INNER_MAP`, so that the
/// agent's tables of any size fit; not preallocated.
#[btf_map]
pub(crate) static LB_MAGLEV_V1: HashOfMaps<
    ServiceKey,
    Array<u64, 1, { MAGLEV_INNER_FLAGS as usize }>,
    { MAX_REVNAT as usize },
    1,
> = HashOfMaps::new();

/// rev-NAT id -> the Service port of the frontend, for `lb-user dump`; never read here.
/// Not preallocated (flag 1, `BPF_F_NO_PREALLOC`): memory only for the frontends there are.
#[btf_map]
pub(crate) static LB_NAMES_V1: HashMap<u16, FrontendName, { MAX_REVNAT as usize }, 1> =
    HashMap::new();

/// Every (address, port, protocol) some frontend has, whatever its scope -> 1: the
/// packet level's first check, one lookup, of whether a packet may be ours. Written by
/// the agent with the frontends; not preallocated.
#[btf_map]
pub(crate) static LB_FRONTEND_PORTS_V1: HashMap<FrontendPort, u8, { MAX_REVNAT as usize }, 1> =
    HashMap::new();

/// rev-NAT id -> frontend address and port.
#[btf_map]
pub(crate) static LB_REVNAT_V2: HashMap<u16, RevNat, { MAX_REVNAT as usize }, 1> = HashMap::new();

/// (socket cookie, backend) -> the frontend that socket asked for: what getpeername()
/// and recvmsg() report instead of the backend.
#[btf_map]
pub(crate) static LB_SOCK_REVNAT_V2: LruHashMap<
    SockRevNatKey,
    RevNat,
    { MAX_SOCK_REVNAT as usize },
> = LruHashMap::new();

/// Socket cookie -> the frontends the socket was translated for, each with its backend
/// and rev-NAT entry: unconnected UDP sticks to its backend through it, and
/// `lb_sock_release` deletes the socket's rev-NAT entries from it. Sized like the
/// socket rev-NAT map (`--max-sock-revnat`).
#[btf_map]
pub(crate) static LB_SOCKS_V1: LruHashMap<u64, SockRecord, { MAX_SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// (client, frontend) -> backend and last use: ClientIP affinity.
#[btf_map]
pub(crate) static LB_AFFINITY_V1: LruHashMap<
    AffinityKey,
    AffinityValue,
    { MAX_AFFINITY as usize },
> = LruHashMap::new();

/// Connection tracking for the packet level: a packet's tuple -> the tuple it is
/// rewritten to (both directions of every translated flow).
#[btf_map]
pub(crate) static LB_CT_V1: LruHashMap<CtKey, CtValue, { MAX_CT as usize }> = LruHashMap::new();

/// A per-CPU scratch area for the packet level's large temporaries (the eBPF stack holds
/// 512 bytes). Not pinned: nothing outlives one program run.
#[btf_map]
pub(crate) static LB_CT_SCRATCH: PerCpuArray<CtScratch, 1> = PerCpuArray::new();

/// A per-CPU scratch area for the packet a tc or XDP program handles and its flow.
#[btf_map]
pub(crate) static LB_PKT_SCRATCH: PerCpuArray<PktScratch, 1> = PerCpuArray::new();

/// [`LB_PKT_SCRATCH`]'s layout.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PktScratch {
    pub packet: Packet,
    pub key: CtKey,
    pub value: CtValue,
    /// A new flow's frontend and its header.
    pub svc: ServiceKey,
    pub header: ServiceValue,
    /// The first check's key ([`crate::tc`]'s `maybe_ours`).
    pub port: FrontendPort,
    /// An ICMP error made here: its IP and ICMP headers and the quote, and the MAC
    /// addresses (destination, source) it goes out with.
    pub icmp: [u8; crate::nat::ICMP_REPLY_LEN],
    pub macs: [u8; 12],
}

/// The scratch area's layout: the other half of a flow, and the other half of the
/// entry that holds a tuple a new flow wants; while a SNAT port is chosen, the port to
/// take if none is free and its rank (here, not on the stack: `ct::create`'s frame is
/// at the limit of the call chain's stack).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CtScratch {
    pub key: CtKey,
    pub value: CtValue,
    pub other_key: CtKey,
    pub other_value: CtValue,
    pub victim_rank: u64,
    pub victim_port: u16,
}

/// IPv4 fragments: (source, destination, IP id, protocol) -> the first fragment's
/// ports, so later fragments (which carry no ports) are translated as their flow.
#[btf_map]
pub(crate) static LB_FRAGS_V1: LruHashMap<FragKey, FragValue, { MAX_FRAGS as usize }> =
    LruHashMap::new();

/// ifindex -> what the packet level needs to know of the interface (the SNAT address).
#[btf_map]
pub(crate) static LB_IFACES_V3: HashMap<u32, PacketIface, { MAX_IFACES as usize }> = HashMap::new();

/// (client source address, frontend) -> backend and last use: ClientIP affinity of the
/// packet level.
#[btf_map]
pub(crate) static LB_AFFINITY_SRC_V1: LruHashMap<
    SrcAffinityKey,
    AffinityValue,
    { MAX_AFFINITY as usize },
> = LruHashMap::new();

/// (frontend rev-NAT id, client prefix) -> 1: loadBalancerSourceRanges of frontends
/// whose header has `SVC_F_SOURCE_RANGES`.
#[btf_map]
pub(crate) static LB_SOURCE_RANGES_V1: LpmTrie<SourceRange, u8, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Per-program counters, indexed by `PROG_*`.
#[btf_map]
pub(crate) static LB_COUNTERS_V5: PerCpuArray<Counters, { PROG_NAMES.len() }> = PerCpuArray::new();

/// Packets the packet level (tc and XDP) dropped, per reason (`DROP_*`).
#[btf_map]
pub(crate) static LB_DROPS_V2: PerCpuArray<u64, { DROP_REASONS.len() }> = PerCpuArray::new();

/// Connection-tracking events, per kind (`CT_EV_*`).
#[btf_map]
pub(crate) static LB_CT_EVENTS_V1: PerCpuArray<u64, { CT_EVENTS.len() }> = PerCpuArray::new();

/// Counts one connection-tracking event `ev` on this CPU.
#[inline(always)]
pub(crate) fn ct_event(ev: u32) {
    if let Some(c) = LB_CT_EVENTS_V1.get_ptr_mut(ev) {
        // SAFETY: a per-CPU slot: nothing else on this CPU runs meanwhile.
        unsafe { *c += 1 };
    }
}

/// Counts one packet dropped for `reason` on this CPU.
#[inline(always)]
pub(crate) fn dropped(reason: u32) {
    if let Some(c) = LB_DROPS_V2.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot: nothing else on this CPU runs meanwhile.
        unsafe { *c += 1 };
    }
}

/// Bumps one of program `prog`'s counters on this CPU.
#[inline(always)]
pub(crate) fn count(prog: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = LB_COUNTERS_V5.get_ptr_mut(prog) {
        // SAFETY: a per-CPU slot: nothing else on this CPU runs this program concurrently.
        f(unsafe { &mut *c });
    }
}
