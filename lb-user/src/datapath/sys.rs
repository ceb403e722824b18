//! The few bpf(2) commands aya does not offer: for cgroup links, open a pinned link,
//! replace a cgroup link's program in place (`BPF_LINK_UPDATE`), and list and detach the
//! cgroup links of a cgroup (for `lb-user cleanup --cgroup`); for maps, many updates in
//! one call (`BPF_MAP_UPDATE_BATCH`) and many entries read in one (`BPF_MAP_LOOKUP_BATCH`),
//! and making a map with flags of our choosing (`BPF_BTF_LOAD`, `BPF_MAP_CREATE`,
//! `BPF_OBJ_PIN`: see [`super::prealloc`]).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// bpf(2) with `attr` (a `union bpf_attr` member, zero-padded by the caller).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised value whose size is passed; the kernel reads
    // and writes only within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A file descriptor returned by bpf(2).
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Writes `keys[i]` -> `values[i]` into `map` in order, in one call
/// (`BPF_MAP_UPDATE_BATCH`, kernel 5.6+). `K` and `V` must be the map's key and value
/// types (their sizes are the map's). On an error, the entries before the failing one
/// are written; returns how many were.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(|e| (0, io::Error::other(e)))?,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
        .map(|_| ())
        .map_err(|e| (attr.count as usize, e))
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call.
const LOOKUP_BATCH: usize = 4096;

/// Every entry of the hash map `map` (hash or LRU hash; `K` and `V` its key and value
/// types), read a few thousand per call (`BPF_MAP_LOOKUP_BATCH`, kernel 5.6+), at most
/// `limit` of them. Entries added or removed meanwhile may or may not be seen; none is
/// seen twice. An error before the first entry (`EINVAL` or `ENOTSUPP` where the kernel
/// or the map type has no batch reads) comes back as is: the caller may walk the keys.
pub fn map_lookup_batch<K: aya::Pod + bytemuck::Zeroable, V: aya::Pod + bytemuck::Zeroable>(
    map: BorrowedFd<'_>,
    limit: usize,
) -> io::Result<Vec<(K, V)>> {
    // The hash maps' position is a bucket number (u32); 8 bytes leave room.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut keys = vec![K::zeroed(); LOOKUP_BATCH];
    let mut values = vec![V::zeroed(); LOOKUP_BATCH];
    let mut out = Vec::new();
    let mut first = true;
    while out.len() < limit {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut token_in) as u64
            },
            out_batch: std::ptr::from_mut(&mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(keys.len());
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match result {
            Ok(_) => {}
            // The end of the map.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            // One bucket holds more entries than the buffers: larger buffers, same place.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                let more = keys.len() * 2;
                keys.resize(more, K::zeroed());
                values.resize(more, V::zeroed());
                continue;
            }
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
    out.truncate(limit);
    Ok(out)
}

/// `BPF_OBJ_PIN` and `BPF_OBJ_GET`'s attribute.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: [u32; 13],
}

/// `cmd` (`BPF_OBJ_PIN` or `BPF_OBJ_GET`) on `path`, with `fd` for a pin.
fn obj_path_cmd(cmd: libc::c_long, path: &Path, fd: u32) -> io::Result<libc::c_long> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
        path_fd: 0,
        _pad: [0; 13],
    };
    bpf(cmd, &mut attr)
}

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_path_cmd(BPF_OBJ_GET, path, 0).map(owned)
}

/// Pins the BPF object `fd` at `path` (`BPF_OBJ_PIN`), which must not exist.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    obj_path_cmd(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// Loads `btf` (raw BTF: header, types, strings) into the kernel (`BPF_BTF_LOAD`). On a
/// refusal, the error carries the last line of the kernel's log.
pub fn btf_load(btf: &[u8]) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        btf: u64,
        btf_log_buf: u64,
        btf_size: u32,
        btf_log_size: u32,
        btf_log_level: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        btf: btf.as_ptr() as u64,
        btf_log_buf: 0,
        btf_size: btf.len() as u32,
        btf_log_size: 0,
        btf_log_level: 0,
        _pad: 0,
    };
    match bpf(BPF_BTF_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            // Again with a log, for the kernel's reason.
            let mut log = vec![0u8; 64 * 1024];
            attr.btf_log_buf = log.as_mut_ptr() as u64;
            attr.btf_log_size = log.len() as u32;
            attr.btf_log_level = 1;
            let _ = bpf(BPF_BTF_LOAD, &mut attr).map(owned);
            let text = String::from_utf8_lossy(&log);
            let why = text
                .trim_end_matches('\0')
                .trim()
                .lines()
                .last()
                .unwrap_or("");
            Err(io::Error::new(e.kind(), format!("{e}: {why}")))
        }
    }
}

/// A map to make with [`map_create`].
#[derive(Clone, Copy, Debug)]
pub struct MapSpec<'a> {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    /// At most 15 bytes are kept.
    pub name: &'a str,
    /// The BTF its key and value types are in, if any, and their ids there.
    pub btf: Option<BorrowedFd<'a>>,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
}

/// `BPF_MAP_CREATE`'s attribute, up to `map_extra`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

/// Makes a map (`BPF_MAP_CREATE`).
pub fn map_create(spec: &MapSpec<'_>) -> io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    let n = spec.name.len().min(15);
    map_name[..n].copy_from_slice(&spec.name.as_bytes()[..n]);
    let mut attr = MapCreateAttr {
        map_type: spec.map_type,
        key_size: spec.key_size,
        value_size: spec.value_size,
        max_entries: spec.max_entries,
        map_flags: spec.map_flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
        map_ifindex: 0,
        btf_fd: spec.btf.map_or(0, |fd| fd.as_raw_fd() as u32),
        btf_key_type_id: spec.btf_key_type_id,
        btf_value_type_id: spec.btf_value_type_id,
        btf_vmlinux_value_type_id: 0,
        map_extra: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Replaces the program of `link` by `prog` in one step: the hook never runs without a
/// program (`BPF_LINK_UPDATE`, kernel 5.7+ for cgroup links).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
        _pad: [u32; 12],
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
        _pad: [0; 12],
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// What the kernel says of one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// For a cgroup link, the cgroup's id (its directory's inode number), else 0.
    pub cgroup_id: u64,
}

/// `struct bpf_link_info`'s head: type, id, prog_id, then (8-aligned) the cgroup part.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 25],
}

/// The link info of `fd` (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo::default();
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        _pad: [u32; 12],
    }
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawLinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
        _pad: [0; 12],
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: if info.type_ == BPF_LINK_TYPE_CGROUP {
            info.cgroup_id
        } else {
            0
        },
    })
}

#[repr(C)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
    _pad: [u32; 13],
}

impl IdAttr {
    fn new(id: u32) -> Self {
        Self {
            id,
            next_id: 0,
            open_flags: 0,
            _pad: [0; 13],
        }
    }
}

/// Every link in the system attached to the cgroup `cgroup_id`, each with an open
/// descriptor (links that go away meanwhile are skipped).
pub fn cgroup_links(cgroup_id: u64) -> io::Result<Vec<(LinkInfo, OwnedFd)>> {
    let mut out = Vec::new();
    let mut id = 0;
    loop {
        let mut attr = IdAttr::new(id);
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let Ok(fd) = bpf(BPF_LINK_GET_FD_BY_ID, &mut IdAttr::new(id)).map(owned) else {
            continue;
        };
        if let Ok(info) = link_info(fd.as_fd())
            && info.cgroup_id == cgroup_id
        {
            out.push((info, fd));
        }
    }
}

/// Detaches a link from its hook even while pins or descriptors hold it
/// (`BPF_LINK_DETACH`, kernel 5.9+).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        _pad: [u32; 15],
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        _pad: [0; 15],
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// A cgroup v2 directory's id, as links report it: its inode number.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel_headers() {
        // bpf_link_info: the cgroup union member starts 8-aligned after three u32s.
        assert_eq!(std::mem::offset_of!(RawLinkInfo, cgroup_id), 16);
        assert_eq!(std::mem::offset_of!(IdAttr, next_id), 4);
        assert_eq!(std::mem::offset_of!(IdAttr, open_flags), 8);
        // union bpf_attr's BPF_MAP_CREATE member.
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, btf_fd), 48);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_extra), 64);
    }

    /// A map of `max` entries (`BPF_MAP_CREATE`) with u64 keys and values.
    fn lru_map(max: u32) -> io::Result<OwnedFd> {
        map_create(&MapSpec {
            map_type: 9, // BPF_MAP_TYPE_LRU_HASH
            key_size: 8,
            value_size: 8,
            max_entries: max,
            map_flags: 0,
            name: "lb_test",
            btf: None,
            btf_key_type_id: 0,
            btf_value_type_id: 0,
        })
    }

    #[test]
    fn batch_reads_return_every_entry_once_across_calls() {
        let map = match lru_map(20_000) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: creating a BPF map needs CAP_BPF: {e}");
                return;
            }
            Err(e) => panic!("BPF_MAP_CREATE: {e}"),
        };
        // More than one call's worth.
        let keys: Vec<u64> = (0..(LOOKUP_BATCH as u64 * 2 + 123)).collect();
        let values: Vec<u64> = keys.iter().map(|k| k * 3).collect();
        map_update_batch(map.as_fd(), &keys, &values).unwrap();
        let mut got = map_lookup_batch::<u64, u64>(map.as_fd(), usize::MAX).unwrap();
        got.sort_unstable();
        let want: Vec<(u64, u64)> = keys.iter().map(|&k| (k, k * 3)).collect();
        assert_eq!(got, want);
        assert_eq!(
            map_lookup_batch::<u64, u64>(map.as_fd(), 10).unwrap().len(),
            10
        );
        let empty = lru_map(16).unwrap();
        assert!(
            map_lookup_batch::<u64, u64>(empty.as_fd(), 16)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn errors_come_back_as_io_errors() {
        let missing = Path::new("/sys/fs/bpf/definitely-not-pinned-here");
        assert!(obj_get(missing).is_err());
        assert!(cgroup_id(missing).is_err());
    }
}
