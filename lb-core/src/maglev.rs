//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4) for the packet
//! level's external traffic: a lookup table of `M` entries (a prime) per frontend, each
//! naming one backend, filled so that every backend holds `M / N` entries (within one)
//! and a backend set that loses or gains one backend moves about `1 / N` of the entries.
//! A new flow's backend is the entry at the hash of its 5-tuple, so every node that
//! builds the table from the same backends sends the same flow to the same backend, and
//! a flow whose conntrack entry is lost comes back to its backend.
//!
//! The table depends only on the set of backends (their address and port), never on
//! their order, ids or the node: each backend's permutation comes from a fixed hash of
//! its address and port.

use std::net::IpAddr;

/// Table sizes the agent accepts: primes, as Cilium's `--bpf-lb-maglev-table-size`.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];

/// Cilium's default table size.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// A backend as the table sees it: what makes its permutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
}

/// `size` if it is one of [`TABLE_SIZES`], else an error naming the choices.
pub fn check_table_size(size: u32) -> Result<u32, String> {
    if TABLE_SIZES.contains(&size) {
        Ok(size)
    } else {
        Err(format!(
            "{size} is not a Maglev table size: one of {TABLE_SIZES:?} (primes; Cilium's default {DEFAULT_TABLE_SIZE})"
        ))
    }
}

/// The lookup table of `size` entries (a prime, see [`TABLE_SIZES`]) for `backends`:
/// entry `i` is an index into `backends`. Empty when there is no backend.
pub fn table(backends: &[Backend], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    if backends.is_empty() || m == 0 {
        return Vec::new();
    }
    // The fill visits the backends in a fixed order (sorted), so that the table does not
    // depend on the order they were given in; the entries name the caller's indices.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    order.dedup_by_key(|i| backends[*i]);
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let key = key_of(&backends[i]);
            let offset = hash64(&key, OFFSET_SEED) % m;
            let skip = hash64(&key, SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut entry = vec![EMPTY; size as usize];
    // Each backend's next position in its permutation, kept as the slot itself:
    // slot(j + 1) = slot(j) + skip (mod m).
    let mut next: Vec<u64> = perms.iter().map(|&(offset, _)| offset).collect();
    let mut filled = 0u64;
    'fill: loop {
        for (k, &(_, skip)) in perms.iter().enumerate() {
            let mut slot = next[k];
            while entry[slot as usize] != EMPTY {
                slot = (slot + skip) % m;
            }
            entry[slot as usize] = order[k] as u32;
            next[k] = (slot + skip) % m;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// A frontend's table as the agent writes it: its size, its backends (id in the
/// backends map, address and port) and a fingerprint of both, kept in the table so
/// that a restarted agent knows which tables it can keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub size: u32,
    pub backends: Vec<(u32, Backend)>,
    pub fingerprint: u64,
}

impl Spec {
    /// The table of `size` entries over `backends` (id, address and port).
    pub fn new(size: u32, mut backends: Vec<(u32, Backend)>) -> Self {
        backends.sort_unstable();
        backends.dedup();
        let fingerprint = fingerprint(size, &backends);
        Self {
            size,
            backends,
            fingerprint,
        }
    }

    /// The backend ids of the table's entries.
    pub fn ids(&self) -> Vec<u32> {
        let set: Vec<Backend> = self.backends.iter().map(|(_, b)| *b).collect();
        table(&set, self.size)
            .into_iter()
            .map(|i| self.backends[i as usize].0)
            .collect()
    }

    /// The table's array elements (`u64`), in the layout the programs read (see
    /// `lb_common::MAGLEV_HEAD`): the size, the fingerprint, then two ids per element.
    pub fn elements(&self) -> Vec<u64> {
        let ids = self.ids();
        let mut out = Vec::with_capacity(lb_common::maglev_elements(self.size) as usize);
        out.push(u64::from(self.size));
        out.push(self.fingerprint);
        out.extend(
            ids.chunks(2).map(|pair| {
                u64::from(pair[0]) | pair.get(1).map_or(0, |&high| u64::from(high) << 32)
            }),
        );
        out
    }

    /// Bytes the table takes in the kernel (its elements; the map's own overhead aside).
    pub fn bytes(&self) -> u64 {
        table_bytes(self.size)
    }
}

/// Bytes a table of `size` entries takes (its elements).
pub const fn table_bytes(size: u32) -> u64 {
    lb_common::maglev_elements(size) as u64 * 8
}

/// The backend id a table built as `elements` names for hash `hash`, as the programs
/// read it; `None` for a table without entries.
pub fn lookup(elements: &[u64], hash: u32) -> Option<u32> {
    let size = *elements.first()? as u32;
    let (element, high) = lb_common::maglev_entry(hash, size)?;
    let e = *elements.get(element as usize)?;
    Some(lb_common::maglev_half(e, high))
}

/// A fixed fingerprint of a table's size and backends (sorted).
fn fingerprint(size: u32, backends: &[(u32, Backend)]) -> u64 {
    let mut bytes = Vec::with_capacity(4 + backends.len() * 22);
    bytes.extend_from_slice(&size.to_be_bytes());
    for (id, b) in backends {
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&key_of(b));
    }
    hash64(&bytes, FINGERPRINT_SEED)
}

const FINGERPRINT_SEED: u64 = 0x6c62_2d6d_6167_6c33; // "lb-magl3"
const OFFSET_SEED: u64 = 0x6c62_2d6d_6167_6c31; // "lb-magl1"
const SKIP_SEED: u64 = 0x6c62_2d6d_6167_6c32; // "lb-magl2"

/// A backend's bytes: its address as 16 bytes (IPv4 mapped) and its port, big endian.
fn key_of(b: &Backend) -> [u8; 18] {
    let v6 = match b.addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut key = [0u8; 18];
    key[..16].copy_from_slice(&v6.octets());
    key[16..].copy_from_slice(&b.port.to_be_bytes());
    key
}

/// A fixed 64-bit hash of `bytes` with `seed` (FNV-1a, then a murmur3 finaliser to
/// spread the bits): the same on every node and every build.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1)),
                port: 8080,
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in t {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn every_backend_holds_m_over_n_entries_within_one() {
        for &m in &[251, 16381] {
            for n in [1, 2, 3, 7, 10, 100, 250] {
                let t = table(&backends(n), m);
                assert_eq!(t.len(), m as usize);
                let c = counts(&t, n);
                let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                assert!(hi - lo <= 1, "m {m}, n {n}: {lo}..{hi}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_entries() {
        let m = DEFAULT_TABLE_SIZE;
        for n in [3, 10, 50] {
            let all = backends(n);
            let before = table(&all, m);
            let gone = n / 2;
            let kept: Vec<Backend> = all.iter().copied().filter(|b| *b != all[gone]).collect();
            let after = table(&kept, m);
            // Entries that named a surviving backend and now name another one.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| b as usize != gone && all[b as usize] != kept[a as usize])
                .count();
            let share_gone = before.iter().filter(|&&b| b as usize == gone).count();
            assert!(
                (share_gone as f64) < (m as f64 / n as f64) + 1.0,
                "n {n}: the gone backend held {share_gone}"
            );
            // The paper's minimal disruption: few of the survivors' entries move.
            assert!(
                (moved as f64) < 0.05 * m as f64,
                "n {n}: {moved} of {m} entries of surviving backends moved"
            );
        }
    }

    #[test]
    fn the_table_depends_only_on_the_set_of_backends() {
        let mut b = backends(20);
        let t1 = table(&b, 251);
        let named: Vec<Backend> = t1.iter().map(|&i| b[i as usize]).collect();
        b.reverse();
        let t2 = table(&b, 251);
        let named2: Vec<Backend> = t2.iter().map(|&i| b[i as usize]).collect();
        assert_eq!(named, named2);
        // Another port is another backend.
        let other = vec![Backend { port: 9090, ..b[0] }];
        assert_eq!(table(&other, 251), vec![0; 251]);
        assert!(table(&[], 251).is_empty());
    }

    #[test]
    fn table_sizes_are_primes_and_others_are_refused() {
        for m in TABLE_SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
        }
        assert_eq!(check_table_size(16381), Ok(16381));
        let e = check_table_size(16384).unwrap_err();
        assert!(e.contains("16381"), "{e}");
    }

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // A table on another node (another build) must be the same: pin the hash.
        assert_eq!(hash64(b"", 0), hash64(b"", 0));
        assert_ne!(hash64(b"a", OFFSET_SEED), hash64(b"a", SKIP_SEED));
        let t = table(&backends(3), 251);
        assert_eq!(&t[..8], &PINNED_FIRST_ENTRIES);
    }

    #[test]
    fn a_spec_packs_two_ids_per_element_and_finds_the_flows_backend() {
        let with_ids: Vec<(u32, Backend)> = backends(3)
            .into_iter()
            .zip([70u32, 50, 60])
            .map(|(b, id)| (id, b))
            .collect();
        let spec = Spec::new(251, with_ids.clone());
        let elements = spec.elements();
        assert_eq!(elements.len() as u32, lb_common::maglev_elements(251));
        assert_eq!(elements[0], 251);
        assert_eq!(elements[1], spec.fingerprint);
        assert_eq!(spec.bytes(), elements.len() as u64 * 8);
        let ids = spec.ids();
        for hash in [0u32, 1, 250, 251, 252, 77_777, u32::MAX] {
            assert_eq!(lookup(&elements, hash), Some(ids[(hash % 251) as usize]));
        }
        // The ids name the same backends as the table's indices do.
        let t = table(&backends(3), 251);
        let by_index: Vec<u32> = t.iter().map(|&i| [70, 50, 60][i as usize]).collect();
        assert_eq!(ids, by_index);
        // The order given does not matter; ids, addresses and the size do.
        let mut reversed = with_ids.clone();
        reversed.reverse();
        assert_eq!(Spec::new(251, reversed), spec);
        let mut renumbered = with_ids.clone();
        renumbered[0].0 = 71;
        assert_ne!(Spec::new(251, renumbered).fingerprint, spec.fingerprint);
        assert_ne!(Spec::new(509, with_ids).fingerprint, spec.fingerprint);
        assert_eq!(lookup(&[], 3), None);
        assert_eq!(lookup(&[0, 0], 3), None);
    }

    #[test]
    fn the_default_table_takes_64_kib() {
        assert_eq!(table_bytes(DEFAULT_TABLE_SIZE), 8 * (2 + 8191));
    }

    /// The first entries of `table(&backends(3), 251)` when this was written.
    const PINNED_FIRST_ENTRIES: [u32; 8] = [2, 1, 2, 2, 1, 1, 1, 2];
}
