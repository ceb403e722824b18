//! Manifest changes noticed as they happen (inotify), beside the poll.
//!
//! A thread watches the manifest directory and every directory a manifest file is in.
//! Any event wakes the poller at once instead of at its next tick; a file renamed into
//! place (`IN_MOVED_TO`: the atomic update kubectl, editors and `write_atomic` make) or
//! closed by its writer (`IN_CLOSE_WRITE`) is noted whole ([`manifest::Complete`]), so
//! it is read without waiting for the settle time. A file written in place and still
//! open is neither (a write after the note takes it back), and waits as before. Where
//! inotify is missing (a filesystem without it, the watch limit reached), the poll alone
//! finds the changes, as it always did.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::Notify;

use super::manifest;

/// The events looked at: anything that adds, removes, renames or writes a file.
const MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// Starts watching `root` (as [`manifest::walk`] reads it, within `limits`) on a thread:
/// notes whole files in `complete` and notifies `wake` after each batch of events.
/// Fails, saying why, when inotify cannot be used (the poll still works).
pub fn start(
    root: PathBuf,
    limits: manifest::Limits,
    complete: manifest::Complete,
    wake: Arc<Notify>,
) -> Result<(), String> {
    let mut watcher = Watcher::new().map_err(|e| format!("inotify: {e}"))?;
    watcher.follow(&root, &limits);
    if watcher.dirs.is_empty() {
        return Err(format!("cannot watch {}", root.display()));
    }
    std::thread::Builder::new()
        .name("lb-inotify".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            // Ends when reading fails (never, while the agent runs).
            while let Ok(events) = watcher.read(&mut buf) {
                let mut dirs_changed = false;
                for (dir, mask, name) in events {
                    let Some(name) = name else {
                        dirs_changed = true; // The directory itself went or moved.
                        continue;
                    };
                    if mask & libc::IN_ISDIR != 0 {
                        dirs_changed = true;
                    } else if mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0 {
                        complete.mark(&dir.join(name));
                    } else if mask & libc::IN_MODIFY != 0 {
                        complete.forget(&dir.join(name));
                    }
                }
                if dirs_changed {
                    watcher.follow(&root, &limits);
                }
                wake.notify_one();
            }
        })
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    Ok(())
}

/// An inotify instance and the directories it watches, by watch descriptor.
struct Watcher {
    fd: OwnedFd,
    dirs: HashMap<i32, PathBuf>,
}

impl Watcher {
    fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: HashMap::new(),
        })
    }

    /// Watches `root` (if a directory) and the directory of every manifest file under it.
    /// A directory watched twice (a second path to it) keeps its first path.
    fn follow(&mut self, root: &Path, limits: &manifest::Limits) {
        let files = manifest::walk(root, limits)
            .map(|w| w.files)
            .unwrap_or_default();
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        if root.is_dir() {
            dirs.push(root.to_path_buf());
        }
        dirs.sort();
        dirs.dedup();
        for dir in dirs {
            let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: a valid descriptor and a NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd >= 0 {
                self.dirs.entry(wd).or_insert(dir);
            }
        }
    }

    /// Waits for events and returns them as (directory, mask, name in it). A watch the
    /// kernel dropped (its directory gone) is forgotten.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<Vec<(PathBuf, u32, Option<PathBuf>)>> {
        // SAFETY: reads into `buf`, within its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let mut out = Vec::new();
        for (wd, mask, name) in parse_events(&buf[..n as usize]) {
            if mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&wd);
            }
            if let Some(dir) = self.dirs.get(&wd) {
                out.push((dir.clone(), mask, name));
            }
        }
        Ok(out)
    }
}

/// `struct inotify_event`s in `buf`: (watch descriptor, mask, name if any).
fn parse_events(buf: &[u8]) -> Vec<(i32, u32, Option<PathBuf>)> {
    const HEAD: usize = 16; // wd, mask, cookie, len
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEAD <= buf.len() {
        let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
        let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
        let Some(name) = buf.get(at + HEAD..at + HEAD + len) else {
            break;
        };
        // The name is NUL-padded to its length.
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        let name =
            (!name.is_empty()).then(|| PathBuf::from(std::ffi::OsString::from_vec(name.to_vec())));
        out.push((wd, mask, name));
        at += HEAD + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        if !padded.is_empty() {
            padded.resize(name.len().div_ceil(16) * 16 + 16, 0);
        }
        let mut b = Vec::new();
        for w in [wd as u32, mask, 0, padded.len() as u32] {
            b.extend(w.to_ne_bytes());
        }
        b.extend(padded);
        b
    }

    #[test]
    fn events_are_split_with_their_names() {
        let mut buf = event(1, libc::IN_MOVED_TO, "web.yaml");
        buf.extend(event(2, libc::IN_DELETE_SELF, ""));
        buf.extend(event(
            1,
            libc::IN_CLOSE_WRITE,
            "a-rather-long-name-of-a-file.yaml",
        ));
        buf.extend([1, 2, 3]); // A cut event is left out.
        let got = parse_events(&buf);
        assert_eq!(
            got,
            vec![
                (1, libc::IN_MOVED_TO, Some(PathBuf::from("web.yaml"))),
                (2, libc::IN_DELETE_SELF, None),
                (
                    1,
                    libc::IN_CLOSE_WRITE,
                    Some(PathBuf::from("a-rather-long-name-of-a-file.yaml"))
                ),
            ]
        );
    }

    #[test]
    fn a_file_renamed_into_place_is_noted_whole_and_wakes_the_poller() {
        let dir = std::env::temp_dir().join(format!("lb-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 1\n").unwrap();
        let complete = manifest::Complete::default();
        let wake = Arc::new(Notify::new());
        start(
            dir.clone(),
            manifest::Limits::default(),
            complete.clone(),
            wake.clone(),
        )
        .unwrap();
        std::fs::write(dir.join(".b.yaml.tmp"), "b: 2\n").unwrap();
        std::fs::rename(dir.join(".b.yaml.tmp"), dir.join("b.yaml")).unwrap();
        let b = dir.join("b.yaml");
        let stamp = manifest::Stamp::of(&b).unwrap();
        let noted = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            complete.holds(&b, &stamp)
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let woken = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified()).await
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert!(noted, "the renamed file is noted whole");
        assert!(woken.is_ok(), "the poller is woken");
    }
}
