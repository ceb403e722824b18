//! Preallocated maps (`lb-user run --preallocate-maps`, on by default).
//!
//! The object declares every map the agent fills with `BPF_F_NO_PREALLOC`: memory is
//! taken as entries are written, and each write allocates (and charges) its element. A
//! preallocated hash map takes the memory of every entry when it is made, and a write
//! then takes an element from a free list: at 10,000 services the first sync's ~200,000
//! writes into the services and backends maps take about a third of the time
//! (`docs/benchmarks.md`). aya cannot change a map's flags at load, so the maps of
//! [`PREALLOCATED`] are made here first, with the object's BTF (bpftool still names their
//! fields), and pinned where the load looks for them; the load reuses them as it reuses
//! any pin. A map already pinned stays as it was made until `lb-user cleanup`.

use super::sys;
use std::{os::fd::AsFd as _, path::Path};

/// The maps that `--preallocate-maps` makes preallocated: the two that hold an entry per
/// backend (a slot per backend of every frontend; a backend per endpoint).
pub const PREALLOCATED: [&str; 2] = [lb_common::MAP_SERVICES, lb_common::MAP_BACKENDS];

const BPF_F_NO_PREALLOC: u32 = 1;

/// What [`make`] did with one map of [`PREALLOCATED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    /// Made preallocated and pinned now.
    Preallocated,
    /// Already pinned, preallocated (`true`) or not; left as it is.
    Pinned { preallocated: bool },
    /// Left to the load (made not preallocated), for the reason given.
    Declined(String),
}

/// With `preallocate`, makes and pins under `pin_dir` each map of [`PREALLOCATED`]
/// that is not pinned there yet, preallocated, `max_entries(name)` entries, with the
/// BTF of `object` (an eBPF ELF object). A map the kernel refuses (its memory, a BTF it
/// cannot load) is left to the load, which makes it as the object declares it. Without
/// `preallocate`, makes nothing. Returns what became of each map.
pub fn make(
    object: &[u8],
    pin_dir: &Path,
    preallocate: bool,
    max_entries: impl Fn(&str) -> u32,
) -> Vec<(&'static str, Made)> {
    let mut out = Vec::new();
    let mut to_make = Vec::new();
    for name in PREALLOCATED {
        match aya::maps::MapInfo::from_pin(pin_dir.join(name)) {
            Ok(info) => out.push((
                name,
                Made::Pinned {
                    preallocated: info.map_flags() & BPF_F_NO_PREALLOC == 0,
                },
            )),
            Err(_) if preallocate => to_make.push(name),
            Err(_) => {}
        }
    }
    if to_make.is_empty() {
        return out;
    }
    let btf = match object_btf(object) {
        Ok(b) => b,
        Err(why) => {
            out.extend(
                to_make
                    .into_iter()
                    .map(|n| (n, Made::Declined(why.clone()))),
            );
            return out;
        }
    };
    for name in to_make {
        let made = match make_one(&btf, name, max_entries(name), pin_dir) {
            Ok(()) => Made::Preallocated,
            Err(why) => Made::Declined(why),
        };
        out.push((name, made));
    }
    out
}

/// The object's BTF, fixed up for this kernel as aya fixes it up for the load, loaded
/// into the kernel; with the object's map definitions.
struct ObjectBtf {
    fd: std::os::fd::OwnedFd,
    maps: std::collections::HashMap<String, aya_obj::Map>,
}

fn object_btf(object: &[u8]) -> Result<ObjectBtf, String> {
    let mut obj =
        aya_obj::Object::parse(object).map_err(|e| format!("cannot parse the object: {e}"))?;
    let features = aya::features()
        .btf()
        .ok_or("the kernel has no BTF support")?;
    let btf = obj
        .fixup_and_sanitize_btf(features)
        .map_err(|e| format!("cannot prepare the object's BTF: {e}"))?
        .ok_or("the object has no BTF")?;
    let fd = sys::btf_load(&btf.to_bytes())
        .map_err(|e| format!("the kernel refused the object's BTF: {e}"))?;
    Ok(ObjectBtf {
        fd,
        maps: std::mem::take(&mut obj.maps),
    })
}

/// Makes map `name` of `btf`'s object preallocated with `max_entries` and pins it.
fn make_one(btf: &ObjectBtf, name: &str, max_entries: u32, pin_dir: &Path) -> Result<(), String> {
    let Some(map @ aya_obj::Map::Btf(def)) = btf.maps.get(name) else {
        return Err("the object has no BTF definition of it".into());
    };
    let spec = sys::MapSpec {
        map_type: map.map_type(),
        key_size: map.key_size(),
        value_size: map.value_size(),
        max_entries,
        map_flags: map.map_flags() & !BPF_F_NO_PREALLOC,
        name,
        btf: Some(btf.fd.as_fd()),
        btf_key_type_id: def.def.btf_key_type_id,
        btf_value_type_id: def.def.btf_value_type_id,
    };
    let fd = sys::map_create(&spec)
        .map_err(|e| format!("the kernel refused it preallocated ({max_entries} entries): {e}"))?;
    let path = pin_dir.join(name);
    sys::obj_pin(fd.as_fd(), &path).map_err(|e| format!("cannot pin it at {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::loader::EbpfObject;

    fn entries(_: &str) -> u32 {
        1024
    }

    #[test]
    fn without_preallocate_nothing_is_made() {
        let dir = std::env::temp_dir().join(format!("lb-prealloc-none-{}", std::process::id()));
        assert_eq!(make(EbpfObject::Full.bytes(), &dir, false, entries), vec![]);
        assert!(!dir.exists());
    }

    #[test]
    fn an_object_that_cannot_be_read_leaves_the_maps_to_the_load_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("lb-prealloc-bad-{}", std::process::id()));
        let made = make(b"not an object", &dir, true, entries);
        assert_eq!(made.len(), 2, "{made:?}");
        for (name, made) in made {
            assert!(PREALLOCATED.contains(&name));
            assert!(
                matches!(&made, Made::Declined(why) if why.starts_with("cannot parse the object")),
                "{made:?}"
            );
        }
    }

    #[test]
    fn maps_are_made_preallocated_once_then_kept() {
        let dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/lb-prealloc-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_err() {
            eprintln!("skipped: no bpf filesystem to pin on (needs root)");
            return;
        }
        let made = make(EbpfObject::Full.bytes(), &dir, true, entries);
        let again = make(EbpfObject::Full.bytes(), &dir, true, entries);
        let infos: Vec<_> = PREALLOCATED
            .iter()
            .map(|n| aya::maps::MapInfo::from_pin(dir.join(n)))
            .collect();
        for name in PREALLOCATED {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(&dir);
        if made.iter().any(
            |(_, m)| matches!(m, Made::Declined(why) if why.contains("Operation not permitted")),
        ) {
            eprintln!("skipped: not allowed to make maps (needs root): {made:?}");
            return;
        }
        assert_eq!(made, PREALLOCATED.map(|n| (n, Made::Preallocated)).to_vec());
        assert_eq!(
            again,
            PREALLOCATED
                .map(|n| (n, Made::Pinned { preallocated: true }))
                .to_vec()
        );
        for info in infos {
            let info = info.unwrap();
            assert_eq!(info.map_flags() & BPF_F_NO_PREALLOC, 0);
            assert_eq!(info.max_entries(), 1024);
        }
    }
}
