//! The datapath layer: all the code that loads the programs and reads or writes the BPF
//! maps.
//!
//! [`Programmed`] mirrors what the maps hold. [`Programmed::plan`](plan::Programmed::plan) diffs it against the
//! desired state and returns the map operations, in an order that never lets a concurrent
//! connect() see a half-written service:
//!
//! 1. new backends are written; affinity entries left under the rev-NAT id of a new
//!    affinity frontend (an id used before) are purged;
//! 2. per frontend: its rev-NAT entry, then changed slots, then the header (slot 0) with
//!    the new count, then slots beyond the new count are deleted;
//! 3. affinity entries pointing at backends that left a frontend are purged (the kernel
//!    also ignores entries whose backend is gone, so the purge may come after the slots);
//! 4. frontends that are gone lose their header first, then their slots and rev-NAT
//!    entry, then their affinity entries;
//! 5. backends no frontend uses any more are deleted.
//!
//! Within step 2 each kind of write is grouped (every frontend's order kept) so that the
//! writes go to the kernel in batches. A backend id is never reused, and every new
//! frontend (and every frontend whose affinity is switched on) gets a new affinity
//! generation: no affinity entry can lead to another service's backend. A frontend that
//! would overfill a map is kept out until there is room.
//!
//! Slots are assigned stably: a backend keeps its slot while it stays, so one endpoint
//! change costs a couple of writes, not a rewrite of the service.
//!
//! * [`checks`]: what the agent needs of its process and the kernel, checked first;
//! * [`loader`]: the bpf filesystem, loading, pinning and attaching the programs;
//! * [`prealloc`]: the services and backends maps made preallocated before the load;
//! * [`sys`]: the bpf(2) commands aya lacks (update a cgroup link in place, list and
//!   detach a cgroup's links, batched map updates, a map made with flags of our choosing);
//! * [`iface`]: the node's interfaces for the tc programs, and the SNAT port range;
//! * [`ops`]: the map operations and [`Snapshot`], the maps' contents as plain data;
//! * [`plan`]: [`Programmed`], the diff of desired state against what the maps hold;
//! * [`maps`]: [`BpfMaps`], the reads and ordered writes of the maps the agent programs
//!   (and the programs' counters);
//! * [`sockets`]: closing the sockets translated to a backend that left
//!   (`SOCK_DESTROY`), and deleting their socket rev-NAT entries.

pub use lb_core::{ops, plan};

pub mod checks;
pub mod iface;
pub mod loader;
pub mod maps;
pub mod netlink;
pub mod prealloc;
pub mod sockets;
pub mod sys;
pub mod tcfilter;

pub use maps::{
    BpfMaps, DatapathError, count_socket_entries, read_conntrack, read_counters, read_ct_events,
    read_drops, read_maglev,
};
pub use ops::{FrontendView, Op, Snapshot, addr_of, frontend_of, ip_of, service_key};
pub use plan::{Plan, Programmed};
