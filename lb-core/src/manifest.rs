//! The manifest source: Service, EndpointSlice and Node objects read from a YAML file or a
//! directory of them, in the shape `kubectl get -o yaml` prints (multi-document YAML and
//! `kind: List` included).
//!
//! What it does with bad or changing input:
//! * A file is split into documents at its `---` lines (a line that is `---` or starts
//!   with `--- `), as YAML does, and each document is parsed alone: a syntax error loses
//!   that document only. Every warning names the file and the document (1-based); a
//!   syntax error's "at line L column C" counts the lines of the file.
//! * A file that changed is read again; when any of its documents does not parse (or the
//!   file cannot be read, is over the size limit, or became empty), its last objects stay
//!   as a whole, with a warning, until it parses cleanly again. A deleted file takes its
//!   objects with it. A file seen for the first time loses only its broken documents.
//! * A file is read only once it has not been written for the settle time (the manifest
//!   source uses one poll interval, at most 500 ms): half a file being written is not
//!   applied. A modification time in the future counts as settled.
//! * The directory walk follows symlinks but reads no directory twice (no loops), and
//!   stops at [`Limits`]: depth, bytes per file, number of files; each with a warning.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt, fs,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize as _;

use crate::model::{
    Change, Kind, ObjKey, Object, Objects, Slice, duplicate_warning, slice::slim_meta,
};

/// Errors that stop a whole load: the path itself (or a directory under it) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifests path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How far the walk goes and how much it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Directories deeper than this below the manifest path are skipped.
    pub depth: usize,
    /// Files larger than this (bytes) are skipped.
    pub file_bytes: u64,
    /// Files after the first this many (in walk order) are skipped.
    pub files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            depth: 16,
            file_bytes: 16 << 20,
            files: 10_000,
        }
    }
}

/// The files a walk found, and what it skipped (one warning each).
#[derive(Debug, Default)]
pub struct Walk {
    pub files: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// The files `load` reads, with the default [`Limits`]: see [`walk`].
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    Ok(walk(path, &Limits::default())?.files)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'))
}

fn is_manifest_name(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The files under `root`: the path itself, or the `*.yaml`, `*.yml` and `*.json` files
/// under a directory (recursively, through symlinks, hidden entries skipped), in name
/// order. Depth first in name order, so a limit always leaves out the same files; a
/// directory already read (a symlink loop, a second link) is skipped, by device and inode.
pub fn walk(root: &Path, limits: &Limits) -> Result<Walk, ManifestError> {
    let meta = fs::metadata(root).map_err(io_error(root))?;
    let mut walk = Walk::default();
    if !meta.is_dir() {
        walk.files.push(root.to_path_buf());
        return Ok(walk);
    }
    let mut visited: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), meta, 0)];
    while let Some((dir, meta, depth)) = stack.pop() {
        if let Some(first) = visited.get(&(meta.dev(), meta.ino())) {
            walk.warnings.push(format!(
                "{}: the directory {} again (a symlink loop or a second link); skipped",
                dir.display(),
                first.display()
            ));
            continue;
        }
        visited.insert((meta.dev(), meta.ino()), dir.clone());
        let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(io_error(&dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| !is_hidden(p))
            .collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            match fs::metadata(&p) {
                Ok(m) if m.is_dir() => subdirs.push((p, m)),
                _ if !is_manifest_name(&p) => {}
                Ok(m) if !m.is_file() => walk
                    .warnings
                    .push(format!("{}: not a regular file; skipped", p.display())),
                // A dangling symlink is listed: reading it says what is wrong.
                _ if walk.files.len() >= limits.files => {
                    walk.warnings.push(format!(
                        "{}: more than {} manifest files under {}; this file and the ones \
                         after it skipped",
                        p.display(),
                        limits.files,
                        root.display()
                    ));
                    walk.files.sort();
                    return Ok(walk);
                }
                _ => walk.files.push(p),
            }
        }
        for (p, m) in subdirs.into_iter().rev() {
            if depth >= limits.depth {
                walk.warnings.push(format!(
                    "{}: more than {} directories below {}; skipped",
                    p.display(),
                    limits.depth,
                    root.display()
                ));
            } else {
                stack.push((p, m, depth + 1));
            }
        }
    }
    walk.files.sort();
    Ok(walk)
}

/// What tells a file changed without reading it: size, inode, modification and status
/// change times (a rename over the file, the usual atomic update, changes the inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    ino: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

impl Stamp {
    /// The file's stamp now; `None` when it cannot be looked at.
    pub fn of(file: &Path) -> Option<Self> {
        let meta = fs::metadata(file).ok()?;
        Some(Self {
            len: meta.len(),
            ino: meta.ino(),
            mtime: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether the file has not been written for `settle` at `now`.
    pub fn settled(&self, settle: Duration, now: SystemTime) -> bool {
        self.mtime.is_none_or(|m| match now.duration_since(m) {
            Ok(age) => age >= settle,
            // Later than `now`: written after `now` was taken (being written), or more
            // than a second ahead (a clock set back, a copied file: settled, since
            // waiting for it could take forever).
            Err(ahead) => ahead.duration() > Duration::from_secs(1),
        })
    }
}

/// Files known to be written whole, whatever their age: each with its stamp when that
/// became known (a writer closed it, or it was renamed into place: the source learns
/// it from inotify). A file whose stamp is still that one is read at once instead of
/// after the settle time; one written again since is not. Shared by the poller's view
/// and the cache (cloning shares it).
#[derive(Clone, Debug, Default)]
pub struct Complete(Arc<std::sync::Mutex<BTreeMap<PathBuf, Stamp>>>);

/// Files [`Complete`] remembers at most; past that, those written again since are
/// forgotten.
const COMPLETE_FILES: usize = 4096;

impl Complete {
    /// Notes that `file` is written whole as it is now.
    pub fn mark(&self, file: &Path) {
        let Some(stamp) = Stamp::of(file) else {
            return;
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(file.to_path_buf(), stamp);
        if map.len() > COMPLETE_FILES {
            map.retain(|f, s| Stamp::of(f).as_ref() == Some(s));
        }
    }

    /// Forgets `file`: it is being written again.
    pub fn forget(&self, file: &Path) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(file);
    }

    /// Whether `file` was noted whole with `stamp`.
    pub fn holds(&self, file: &Path, stamp: &Stamp) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(file) == Some(stamp)
    }

    /// Whether `file`, whose stamp is `stamp`, is still being written at `now`: written
    /// within `settle` and not noted whole since.
    fn writing(
        &self,
        file: &Path,
        stamp: Option<&Stamp>,
        settle: Duration,
        now: SystemTime,
    ) -> bool {
        stamp.is_some_and(|s| !s.settled(settle, now) && !self.holds(file, s))
    }
}

/// The poller's view: each manifest file's stamp as of when it last settled. It changes
/// when a file settles after a write, appears settled, or goes; not while a file is
/// being written, so the source is not asked to read what it would defer.
#[derive(Debug, Default)]
pub struct Settled {
    seen: Option<BTreeMap<PathBuf, Option<Stamp>>>,
    /// How many files the last look found still being written.
    young: usize,
    complete: Complete,
}

impl Settled {
    /// A view that takes the files `complete` holds as settled.
    pub fn with_complete(complete: Complete) -> Self {
        Self {
            complete,
            ..Self::default()
        }
    }

    /// Looks at `path` again at `now`; true when the view changed (and the first time).
    pub fn observe(
        &mut self,
        path: &Path,
        limits: &Limits,
        settle: Duration,
        now: SystemTime,
    ) -> bool {
        let files = walk(path, limits).map(|w| w.files).unwrap_or_default();
        let mut next = BTreeMap::new();
        self.young = 0;
        for file in files {
            let stamp = Stamp::of(&file);
            if self.complete.writing(&file, stamp.as_ref(), settle, now) {
                self.young += 1;
                // Being written: its last settled stamp, if any, stands for it.
                let last = self.seen.as_ref().and_then(|s| s.get(&file)).copied();
                if let Some(last) = last {
                    next.insert(file, last);
                }
            } else {
                next.insert(file, stamp);
            }
        }
        let changed = self.seen.as_ref() != Some(&next);
        self.seen = Some(next);
        changed
    }

    /// How many files the last look found still being written (held back).
    pub fn young(&self) -> usize {
        self.young
    }
}

/// Reads every object under `path` (whatever the files' age).
pub fn load(path: &Path) -> Result<Loaded, ManifestError> {
    let limits = Limits::default();
    let walk = walk(path, &limits)?;
    let mut loaded = Loaded {
        warnings: walk.warnings,
        ..Default::default()
    };
    for file in walk.files {
        let name = file.display().to_string();
        match read_text(&file, limits.file_bytes) {
            Ok(text) => parse_into(&text, &name, &mut loaded),
            Err(e) => loaded.warnings.push(format!("{name}: {e}; skipped")),
        }
    }
    Ok(loaded)
}

/// A file's text, at most `limit` bytes of it.
fn read_text(file: &Path, limit: u64) -> Result<String, String> {
    let too_big = || format!("larger than the limit of {limit} bytes per file");
    let f = fs::File::open(file).map_err(|e| format!("cannot read: {e}"))?;
    if f.metadata().is_ok_and(|m| m.len() > limit) {
        return Err(too_big());
    }
    let mut text = String::new();
    f.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(text)
}

/// Where in its file an object is defined: the document (1-based) and, for a member of
/// a `kind: List`, its index in `items`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub document: u32,
    pub item: Option<u32>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// The [`Origin`] of each object of [`Objects`], in the same order.
#[derive(Debug, Default)]
pub struct Origins {
    pub services: Vec<Origin>,
    pub slices: Vec<Origin>,
    pub nodes: Vec<Origin>,
}

/// Everything read from a manifest path, with one warning per skipped document or object.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Objects,
    pub origins: Origins,
    pub warnings: Vec<String>,
    /// The documents (numbers) that did not parse or held an object that could not be
    /// read: the file is not clean.
    pub broken: Vec<u32>,
}

type Id = (Kind, ObjKey);

/// An object and where in its file it is defined.
type Located = (Object, Origin);

/// One file as last read.
#[derive(Debug)]
struct FileEntry {
    stamp: Option<Stamp>,
    /// Its objects sorted by [`Object::id`], one of each (the first definition).
    objects: Vec<Object>,
    /// Where each of `objects` is defined.
    origins: Vec<Origin>,
    warnings: Vec<String>,
}

impl FileEntry {
    /// Reads `file`; with what is wrong with it, if anything (it is then not clean).
    fn read(file: &Path, stamp: Option<Stamp>, limits: &Limits) -> (Self, Option<String>) {
        let name = file.display().to_string();
        let mut loaded = Loaded::default();
        let trouble = match read_text(file, limits.file_bytes) {
            Ok(text) if text.is_empty() => Some("empty (being written?)".to_string()),
            Ok(text) => {
                parse_into(&text, &name, &mut loaded);
                let mut broken = std::mem::take(&mut loaded.broken);
                broken.dedup();
                let numbers: Vec<String> = broken.iter().map(u32::to_string).collect();
                (!broken.is_empty()).then(|| format!("document {} broken", numbers.join(", ")))
            }
            Err(e) => {
                loaded.warnings.push(format!("{name}: {e}; skipped"));
                Some(e)
            }
        };
        (Self::from_loaded(&name, stamp, loaded), trouble)
    }

    /// The entry of a file's objects: sorted, duplicates dropped with a warning.
    fn from_loaded(name: &str, stamp: Option<Stamp>, loaded: Loaded) -> Self {
        let Loaded {
            objects,
            origins,
            warnings,
            broken: _,
        } = loaded;
        Self::from_objects(name, stamp, shared(objects, origins), warnings)
    }

    /// Reads `file` as [`Self::read`] does, handing `part` the objects of each
    /// `part_documents` documents as soon as they are parsed (for the first read: a
    /// file seen for the first time has no last good objects to keep).
    fn read_in_parts(
        file: &Path,
        stamp: Option<Stamp>,
        limits: &Limits,
        part_documents: usize,
        part: &mut dyn FnMut(&[Located]),
    ) -> Self {
        let name = file.display().to_string();
        let text = match read_text(file, limits.file_bytes) {
            Ok(text) => text,
            Err(e) => {
                let warning = format!("{name}: {e}; skipped");
                return Self::from_objects(&name, stamp, Vec::new(), vec![warning]);
            }
        };
        let (mut all, mut warnings) = (Vec::new(), Vec::new());
        for docs in documents(&text).chunks(part_documents.max(1)) {
            let mut loaded = Loaded::default();
            for doc in docs {
                parse_document(doc, &name, &mut loaded);
            }
            let from = all.len();
            all.extend(shared(loaded.objects, loaded.origins));
            warnings.extend(loaded.warnings);
            part(&all[from..]);
        }
        Self::from_objects(&name, stamp, all, warnings)
    }

    /// The entry of a file's objects (each kind in file order): sorted, duplicates
    /// dropped with a warning.
    fn from_objects(
        name: &str,
        stamp: Option<Stamp>,
        mut all: Vec<(Object, Origin)>,
        mut warnings: Vec<String>,
    ) -> Self {
        // Stable: of two definitions, the first stays first.
        all.sort_by(|a, b| a.0.id().cmp(&b.0.id()));
        all.dedup_by(|later, first| {
            let dup = later.0.id() == first.0.id();
            if dup {
                let dup = duplicate_warning(later.0.kind(), &later.0.key());
                warnings.push(format!("{name}: {}: {dup} ({})", later.1, first.1));
            }
            dup
        });
        let (mut objects, mut origins): (Vec<Object>, Vec<Origin>) = all.into_iter().unzip();
        objects.shrink_to_fit();
        origins.shrink_to_fit();
        Self {
            stamp,
            objects,
            origins,
            warnings,
        }
    }

    /// The file's entry after a new read: the new one, unless the file is not clean and
    /// the old one has objects, which then stay (with the new warnings and one more).
    /// True when the objects were replaced.
    fn succeed(old: Option<Self>, new: Self, trouble: Option<String>, name: &str) -> (Self, bool) {
        match (trouble, old) {
            (Some(why), Some(mut old)) if !old.objects.is_empty() => {
                old.stamp = new.stamp;
                old.warnings = new.warnings;
                old.warnings.push(format!(
                    "{name}: {why}: keeping the {} objects of its last good version until it \
                     parses cleanly",
                    old.objects.len()
                ));
                (old, false)
            }
            _ => (new, true),
        }
    }

    fn find(&self, id: &Id) -> Option<usize> {
        let want = (id.0, id.1.0.as_str(), id.1.1.as_str());
        self.objects.binary_search_by(|o| o.id().cmp(&want)).ok()
    }

    fn get(&self, id: &Id) -> Option<&Object> {
        self.find(id).map(|i| &self.objects[i])
    }

    fn ids(&self) -> impl Iterator<Item = Id> + '_ {
        self.objects.iter().map(|o| (o.kind(), o.key()))
    }
}

/// A file's objects as the cache shares them, with their origins: each kind in file
/// order, metadata slimmed.
fn shared(objects: Objects, origins: Origins) -> Vec<(Object, Origin)> {
    // A saved object's resourceVersion and uid say nothing about a file's edits:
    // dropped, so that a changed file is compared by content.
    let unversioned = |m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.resource_version = None;
        m.uid = None;
    };
    (objects.services.into_iter())
        .map(|mut o| {
            slim_meta(&mut o.metadata);
            unversioned(&mut o.metadata);
            Object::Service(Arc::new(o))
        })
        .zip(origins.services)
        .chain(
            (objects.slices.into_iter())
                .map(|o| {
                    let mut o = o.slim();
                    unversioned(&mut o.metadata);
                    Object::EndpointSlice(Arc::new(o))
                })
                .zip(origins.slices),
        )
        .chain(
            (objects.nodes.into_iter())
                .map(|mut o| {
                    unversioned(&mut o.metadata);
                    Object::Node(Arc::new(o))
                })
                .zip(origins.nodes),
        )
        .collect()
}

/// How many documents [`Cache::read_first`] parses before it hands their objects over.
pub const PART_DOCUMENTS: usize = 2048;

/// Where a shared object is: the same address is the same object.
fn address(o: &Object) -> usize {
    match o {
        Object::Service(a) => Arc::as_ptr(a) as usize,
        Object::EndpointSlice(a) => Arc::as_ptr(a) as usize,
        Object::Node(a) => Arc::as_ptr(a) as usize,
    }
}

/// The manifest source's memory: each file's objects, parsed again only when the file
/// changed and has settled, and the changes that makes to the whole set (an object
/// defined in several files: the first file in name order wins, with a warning).
#[derive(Debug, Default)]
pub struct Cache {
    files: BTreeMap<PathBuf, FileEntry>,
    /// The objects defined in more than one file.
    duplicated: BTreeSet<Id>,
    /// How long a file must stay unwritten before it is read (zero: at once).
    settle: Duration,
    limits: Limits,
    /// Files read at once, whatever their age.
    complete: Complete,
}

impl Cache {
    pub fn new(settle: Duration, limits: Limits) -> Self {
        Self {
            settle,
            limits,
            ..Self::default()
        }
    }

    /// Reads the files `complete` holds at once, whatever their age.
    pub fn with_complete(self, complete: Complete) -> Self {
        Self { complete, ..self }
    }

    /// Reads what changed under `path` since the last call (the files that settled by
    /// `now`) and returns it as changes, with the warnings of every file (not only the
    /// changed ones) and of the walk.
    pub fn refresh(
        &mut self,
        path: &Path,
        now: SystemTime,
    ) -> Result<(Vec<Change>, Vec<String>), ManifestError> {
        let walk = walk(path, &self.limits)?;
        let mut seen = BTreeMap::new();
        let mut touched: BTreeSet<Id> = BTreeSet::new();
        for file in walk.files {
            let stamp = Stamp::of(&file);
            let entry = match self.files.remove(&file) {
                Some(e) if e.stamp == stamp && stamp.is_some() => e,
                // Still being written: what was read before stays until it settles.
                old if self
                    .complete
                    .writing(&file, stamp.as_ref(), self.settle, now) =>
                {
                    match old {
                        Some(e) => e,
                        None => continue,
                    }
                }
                old => {
                    let (new, trouble) = FileEntry::read(&file, stamp, &self.limits);
                    let old_ids: Vec<Id> = old.iter().flat_map(FileEntry::ids).collect();
                    let name = file.display().to_string();
                    let (entry, replaced) = FileEntry::succeed(old, new, trouble, &name);
                    if replaced {
                        touched.extend(old_ids);
                        touched.extend(entry.ids());
                    }
                    entry
                }
            };
            seen.insert(file, entry);
        }
        for old in std::mem::replace(&mut self.files, seen).values() {
            touched.extend(old.ids());
        }
        let changes = self.changes(touched);
        let mut warnings = walk.warnings;
        warnings.extend(self.warnings());
        Ok((changes, warnings))
    }

    /// The first read of `path` (on an empty cache), in parts: `part` gets the objects of
    /// every [`PART_DOCUMENTS`] documents as soon as they are parsed (each object's first
    /// definition in the walk's order; the source hands them over while the rest is
    /// read). Returns what those parts did not say (an object whose definition in use,
    /// by [`Self::refresh`]'s rules, is not the one handed over; normally nothing), and
    /// the warnings. The cache is then as [`Self::refresh`] leaves it: a file not settled
    /// by `now` is left to the next refresh.
    pub fn read_first(
        &mut self,
        path: &Path,
        now: SystemTime,
        mut part: impl FnMut(Vec<Change>),
    ) -> Result<(Vec<Change>, Vec<String>), ManifestError> {
        let walk = walk(path, &self.limits)?;
        let mut handed_ids: HashSet<Id> = HashSet::new();
        // The handed objects, by address: the same object (shared) when it is in use.
        let mut handed: HashSet<usize> = HashSet::new();
        let mut hand = |objects: &[Located]| {
            let changes: Vec<Change> = (objects.iter())
                .filter(|(o, _)| handed_ids.insert((o.kind(), o.key())))
                .map(|(o, _)| {
                    handed.insert(address(o));
                    Change::Apply(o.clone())
                })
                .collect();
            if !changes.is_empty() {
                part(changes);
            }
        };
        for file in walk.files {
            let stamp = Stamp::of(&file);
            if self
                .complete
                .writing(&file, stamp.as_ref(), self.settle, now)
            {
                continue; // Being written: the next refresh reads it.
            }
            let entry =
                FileEntry::read_in_parts(&file, stamp, &self.limits, PART_DOCUMENTS, &mut hand);
            self.files.insert(file, entry);
        }
        // Each object's definition in use is its first file's (in name order), as in
        // [`Self::changes`].
        let mut in_use = HashSet::new();
        let (mut changes, mut duplicated) = (Vec::new(), BTreeSet::new());
        for object in self.files.values().flat_map(|f| &f.objects) {
            if !in_use.insert(object.id()) {
                duplicated.insert((object.kind(), object.key()));
            } else if !handed.contains(&address(object)) {
                changes.push(Change::Apply(object.clone()));
            }
        }
        self.duplicated = duplicated;
        let mut warnings = walk.warnings;
        warnings.extend(self.warnings());
        Ok((changes, warnings))
    }

    /// The change of each touched object (the first file's definition, or its deletion);
    /// notes which are defined more than once.
    fn changes(&mut self, touched: BTreeSet<Id>) -> Vec<Change> {
        let mut changes = Vec::with_capacity(touched.len());
        for id in touched {
            let mut defined = self.files.values().filter_map(|f| f.get(&id));
            match defined.next() {
                Some(obj) => changes.push(Change::Apply(obj.clone())),
                None => changes.push(Change::Delete(id.0, id.1.clone())),
            }
            if defined.next().is_some() {
                self.duplicated.insert(id);
            } else {
                self.duplicated.remove(&id);
            }
        }
        changes
    }

    /// Every file's warnings, then one per object defined in several files.
    fn warnings(&self) -> Vec<String> {
        let mut warnings: Vec<String> = self
            .files
            .values()
            .flat_map(|f| f.warnings.iter().cloned())
            .collect();
        for id @ (kind, key) in &self.duplicated {
            let places: Vec<String> = self
                .files
                .iter()
                .filter_map(|(name, f)| {
                    let i = f.find(id)?;
                    Some(format!("{}, {}", name.display(), f.origins[i]))
                })
                .collect();
            warnings.push(format!(
                "{} (in {})",
                duplicate_warning(*kind, key),
                places.join("; ")
            ));
        }
        warnings
    }

    /// Where the object in use of `kind` named `key` is defined: "FILE, document N"
    /// (", items[I]" for a List member).
    pub fn origin(&self, kind: Kind, key: &ObjKey) -> Option<String> {
        let id = (kind, key.clone());
        self.files.iter().find_map(|(name, f)| {
            let i = f.find(&id)?;
            Some(format!("{}, {}", name.display(), f.origins[i]))
        })
    }
}

impl Loaded {
    fn push_service(&mut self, svc: Service, origin: Origin) {
        self.objects.services.push(svc);
        self.origins.services.push(origin);
    }

    fn push_slice(&mut self, slice: Slice, origin: Origin) {
        self.objects.slices.push(slice);
        self.origins.slices.push(origin);
    }

    fn push_node(&mut self, node: Node, origin: Origin) {
        self.objects.nodes.push(node);
        self.origins.nodes.push(origin);
    }
}

/// One document of a file: its text (with its `---` line), its number (1-based) and the
/// line of the file it starts on (1-based).
#[derive(Debug, PartialEq, Eq)]
struct Document<'a> {
    text: &'a str,
    number: u32,
    line: usize,
}

/// Whether a line (with its line break) is a document start: `---` alone or followed by
/// a space or a tab.
fn is_separator(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Whether a text holds only blank lines, comments and directives (`%YAML`, `%TAG`).
fn no_content(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim_start();
        t.is_empty() || t.starts_with('#') || l.starts_with('%')
    })
}

/// The documents of a YAML stream, split at its `---` lines as YAML does (inside a
/// document such a line can only be content indented, or else is forbidden). Text
/// before the first `---` is a document only if it has content; directives before a
/// `---` go with the document they introduce.
fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    // Where the directives (and comments) just before a `---` begin.
    let mut preamble: Option<(usize, usize)> = None;
    let (mut at, mut line_no) = (0, 1);
    for line in text.split_inclusive('\n') {
        if is_separator(line) {
            let (cut, cut_line) = preamble.unwrap_or((at, line_no));
            let head = &text[start..cut];
            if !(docs.is_empty() && no_content(head)) {
                docs.push((head, start_line));
            }
            (start, start_line) = (cut, cut_line);
            preamble = None;
        } else if line.starts_with('%') {
            preamble.get_or_insert((at, line_no));
        } else if !(line.trim().is_empty() || line.trim_start().starts_with('#')) {
            preamble = None;
        }
        at += line.len();
        line_no += 1;
    }
    let tail = &text[start..];
    if !(docs.is_empty() && no_content(tail)) {
        docs.push((tail, start_line));
    }
    (docs.into_iter().enumerate())
        .map(|(i, (text, line))| Document {
            text,
            number: i as u32 + 1,
            line,
        })
        .collect()
}

/// Parses one file's text (multi-document YAML, or JSON) into `loaded`, document by
/// document: a document that does not parse is skipped with a warning and marked broken.
pub fn parse_into(text: &str, file: &str, loaded: &mut Loaded) {
    for doc in documents(text) {
        parse_document(&doc, file, loaded);
    }
}

/// Parses one document of `file` into `loaded` (see [`parse_into`]).
fn parse_document(doc: &Document<'_>, file: &str, loaded: &mut Loaded) {
    let origin = Origin {
        document: doc.number,
        item: None,
    };
    if parse_fast(doc.text, origin, loaded).is_none() {
        parse_checked(doc, file, loaded);
    }
}

/// The fast path for the usual document: block style, with a top-level `apiVersion:`
/// and `kind:` line, read straight into its type: by [`crate::plain_yaml`] when the
/// document is in its subset, else by serde_yaml. `None` (nothing added) as soon as
/// anything is unusual or does not parse: the caller then reads it with
/// [`parse_checked`], which names what is wrong and where.
fn parse_fast(doc: &str, origin: Origin, loaded: &mut Loaded) -> Option<()> {
    match type_of(doc)? {
        ("v1", "Service") => loaded.push_service(typed(doc)?, origin),
        ("discovery.k8s.io/v1", "EndpointSlice") => loaded.push_slice(typed(doc)?, origin),
        ("v1", "Node") => loaded.push_node(typed(doc)?, origin),
        (_, "List") => return None,
        _ => {} // Not used (the checked path logs it at debug level).
    }
    Some(())
}

/// A document as a `T`: by the plain-YAML reader when it reads the document as a `T`,
/// else by serde_yaml.
fn typed<T: serde::de::DeserializeOwned>(doc: &str) -> Option<T> {
    crate::plain_yaml::from_str(doc).or_else(|| serde_yaml::from_str(doc).ok())
}

/// (apiVersion, kind) from a document's top-level lines, plain scalars only.
fn type_of(doc: &str) -> Option<(&str, &str)> {
    let mut api_version = None;
    let mut kind = None;
    for line in doc.lines() {
        if let Some(v) = line.strip_prefix("apiVersion:") {
            api_version = Some(plain(v)?);
        } else if let Some(v) = line.strip_prefix("kind:") {
            kind = Some(plain(v)?);
        }
    }
    Some((api_version?, kind?))
}

fn plain(value: &str) -> Option<&str> {
    let v = value.trim();
    let ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./-".contains(c));
    ok.then_some(v)
}

/// `msg` with every "line N column" moved down `by` lines: serde_yaml counts the lines of
/// the document, the warning those of the file.
fn shift_lines(msg: &str, by: usize) -> String {
    let mut out = String::with_capacity(msg.len() + 8);
    let mut rest = msg;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        rest = tail;
        if let Ok(n) = tail[..digits].parse::<usize>()
            && tail[digits..].starts_with(" column ")
        {
            out.push_str(&(n + by).to_string());
            rest = &tail[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// Parses one document, with a warning naming the file, the document (and the line of
/// a syntax error), the object and the field for everything skipped.
fn parse_checked(doc: &Document<'_>, file: &str, loaded: &mut Loaded) {
    let origin = Origin {
        document: doc.number,
        item: None,
    };
    // A document cut off by `...` may be followed by another: each is read.
    for part in serde_yaml::Deserializer::from_str(doc.text) {
        match serde_yaml::Value::deserialize(part) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => add_object(value, file, origin, loaded),
            Err(e) => {
                // serde_yaml's "at line L column C", moved to the file's lines.
                loaded.warnings.push(format!(
                    "{file}: {origin}: not valid YAML: {}; skipped",
                    shift_lines(&e.to_string(), doc.line - 1)
                ));
                loaded.broken.push(doc.number);
                // This document's stream cannot be resumed: the next starts at its `---`.
                break;
            }
        }
    }
}

fn field<'a>(value: &'a serde_yaml::Value, name: &str) -> Option<&'a str> {
    value.get(name).and_then(|v| v.as_str())
}

/// Adds the object `value` (or a List's members) to `loaded`, or warns and marks its
/// document broken.
fn add_object(value: serde_yaml::Value, file: &str, origin: Origin, loaded: &mut Loaded) {
    let where_ = format!("{file}: {origin}");
    let kind = field(&value, "kind").unwrap_or("").to_string();
    let api_version = field(&value, "apiVersion").unwrap_or("").to_string();
    let name = {
        let meta = value.get("metadata");
        let ns = meta
            .and_then(|m| field(m, "namespace"))
            .unwrap_or("default");
        let name = meta.and_then(|m| field(m, "name")).unwrap_or("<no name>");
        format!("{ns}/{name}")
    };
    let bad = |loaded: &mut Loaded, what: String| {
        loaded.warnings.push(format!("{where_}: {what}; skipped"));
        loaded.broken.push(origin.document);
    };
    match (api_version.as_str(), kind.as_str()) {
        (_, "List") => match value.get("items").cloned() {
            Some(serde_yaml::Value::Sequence(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let item_origin = Origin {
                        item: Some(i as u32),
                        ..origin
                    };
                    add_object(item, file, item_origin, loaded);
                }
            }
            None | Some(serde_yaml::Value::Null) => {}
            Some(_) => bad(loaded, "List: field items: not a list".into()),
        },
        ("v1", "Service") => match decode::<Service>(value, "Service", &name) {
            Ok(svc) => loaded.push_service(svc, origin),
            Err(e) => bad(loaded, e),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match decode::<Slice>(value, "EndpointSlice", &name) {
                Ok(slice) => loaded.push_slice(slice, origin),
                Err(e) => bad(loaded, e),
            }
        }
        ("v1", "Node") => match decode::<Node>(value, "Node", &name) {
            Ok(node) => loaded.push_node(node, origin),
            Err(e) => bad(loaded, e),
        },
        ("", _) | (_, "") => bad(
            loaded,
            format!(
                "no apiVersion or no kind ({api_version:?}, {kind:?}): not a Kubernetes object"
            ),
        ),
        _ => tracing::debug!("{where_}: {api_version} {kind} {name}: not used; skipped"),
    }
}

/// `value` as a `T`, or what is wrong: the object and the field.
fn decode<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    kind: &str,
    name: &str,
) -> Result<T, String> {
    serde_path_to_error::deserialize::<_, T>(value)
        .map_err(|e| format!("{kind} {name}: field {}: {}", e.path(), e.inner()))
}
#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loaded {
        let mut loaded = Loaded::default();
        parse_into(text, "test.yaml", &mut loaded);
        loaded
    }

    fn svc(name: &str) -> String {
        SVC.replace("web", name)
    }

    fn names(l: &Loaded) -> Vec<String> {
        (l.objects.services.iter())
            .map(|s| s.metadata.name.clone().unwrap())
            .collect()
    }

    /// A directory under the system's temporary one, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("lb-manifest-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Writes `name` with a modification time an hour ago (settled for any test).
        fn write_old(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::write(&p, text).unwrap();
            set_mtime(&p, SystemTime::now() - Duration::from_secs(3600));
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn set_mtime(p: &Path, t: SystemTime) {
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// The model's service names after applying a refresh of `cache`; with its
    /// number of changes and its warnings.
    fn refresh_at(
        cache: &mut Cache,
        dir: &Path,
        model: &mut crate::model::Model,
        now: SystemTime,
    ) -> (usize, Vec<String>, Vec<String>) {
        let (changes, warnings) = cache.refresh(dir, now).unwrap();
        let n = changes.len();
        for c in changes {
            model.apply(c);
        }
        let names = (model.objects().services.iter())
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        (n, names, warnings)
    }

    fn refresh(
        cache: &mut Cache,
        dir: &Path,
        model: &mut crate::model::Model,
    ) -> (usize, Vec<String>, Vec<String>) {
        refresh_at(cache, dir, model, SystemTime::now())
    }

    fn new_model() -> crate::model::Model {
        crate::model::Model::new(None, Vec::new())
    }

    const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

    #[test]
    fn multi_document_with_empty_documents() {
        let text = format!(
            "---\n{SVC}---\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: shop}}\naddressType: IPv4\nendpoints: []\n"
        );
        let l = parse(&text);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.objects.services.len(), 1);
        assert_eq!(l.objects.slices.len(), 1);
        assert_eq!(
            l.objects.services[0].metadata.namespace.as_deref(),
            Some("shop")
        );
        let doc = |document| Origin {
            document,
            item: None,
        };
        assert_eq!(l.origins.services, [doc(1)]);
        assert_eq!(l.origins.slices, [doc(3)], "document 2 is the empty one");
    }

    #[test]
    fn documents_split_at_separator_lines_only() {
        let text = "# head\n%YAML 1.2\n--- # one\na: 1\n---x: 2\n  ---\nb: |\n  ---\n---\r\n\
                    c: 3\n---\t\n...\n";
        // The comment before the directive is not in any document.
        let docs = documents(text);
        let got: Vec<(u32, usize, &str)> =
            docs.iter().map(|d| (d.number, d.line, d.text)).collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    2,
                    "%YAML 1.2\n--- # one\na: 1\n---x: 2\n  ---\nb: |\n  ---\n"
                ),
                (2, 9, "---\r\nc: 3\n"),
                (3, 11, "---\t\n...\n"),
            ]
        );
        // Content before the first `---` is a document of its own.
        let docs = documents("a: 1\n---\nb: 2\n");
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[1].number, docs[1].line), (2, 2));
        assert!(documents("").is_empty());
        assert!(documents("# nothing\n").is_empty());
    }

    #[test]
    fn a_broken_document_in_the_middle_keeps_the_others() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [b\n---\n{}",
            svc("a"),
            svc("c")
        );
        let l = parse(&text);
        assert_eq!(names(&l), ["a", "c"], "only document 2 is lost");
        assert_eq!(l.broken, [2]);
        assert_eq!(l.origins.services[1].document, 3);
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        let w = &l.warnings[0];
        // Document 2 is lines 7-10 of the file; its error is found at its end, line 11 of
        // the file (the next `---`), where the flow sequence opened on line 10 is still open.
        assert!(
            w.starts_with("test.yaml: document 2: not valid YAML: "),
            "{w}"
        );
        assert!(
            w.contains("at line 11 column 1, while parsing a flow sequence at line 10"),
            "{w}"
        );
        assert!(w.ends_with("; skipped"), "{w}");
    }

    #[test]
    fn line_numbers_in_messages_move_to_the_file() {
        assert_eq!(
            shift_lines("x at line 3 column 4, while y at line 2 column 1", 10),
            "x at line 13 column 4, while y at line 12 column 1"
        );
        assert_eq!(shift_lines("the line 3 is fine", 10), "the line 3 is fine");
        assert_eq!(shift_lines("line ", 1), "line ");
    }

    #[test]
    fn kind_list_items_are_read() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
                    metadata: {name: a}\n  spec: {clusterIP: 10.96.0.1}\n- apiVersion: v1\n  \
                    kind: Node\n  metadata: {name: node-1}\n";
        let l = parse(text);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.objects.services.len(), 1);
        assert_eq!(l.objects.nodes.len(), 1);
        assert_eq!(l.origins.nodes[0].to_string(), "document 1, items[1]");
    }

    #[test]
    fn bad_field_names_object_and_field_and_keeps_the_rest() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: ns1}}\n\
             spec:\n  ports: [{{port: eighty}}]\n---\n{SVC}"
        );
        let l = parse(&text);
        assert_eq!(l.objects.services.len(), 1, "the good service is kept");
        assert_eq!(l.broken, [1]);
        assert_eq!(l.warnings.len(), 1);
        let w = &l.warnings[0];
        assert!(w.contains("test.yaml: document 1"), "{w}");
        assert!(w.contains("Service ns1/bad"), "{w}");
        assert!(w.contains("spec.ports[0].port"), "{w}");
    }

    #[test]
    fn other_kinds_are_skipped_quietly_and_non_objects_warn() {
        let l = parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n42\n---\n\
             apiVersion: v1\nmetadata: {name: e}\n",
        );
        assert!(l.objects.services.is_empty());
        assert_eq!(l.warnings.len(), 2, "{:?}", l.warnings);
        assert!(l.warnings[0].starts_with("test.yaml: document 2: no apiVersion or no kind"));
        assert!(l.warnings[1].starts_with("test.yaml: document 3: no apiVersion or no kind"));
        assert_eq!(l.broken, [2, 3]);
    }

    #[test]
    fn broken_yaml_warns_with_file_name() {
        let l = parse("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        assert_eq!(l.warnings.len(), 1);
        assert!(
            l.warnings[0].starts_with("test.yaml: document 1: not valid YAML"),
            "{:?}",
            l.warnings
        );
    }

    #[test]
    fn cache_reports_changed_files_only_and_forgets_removed_ones() {
        let tmp = TempDir::new("cache");
        let dir = &tmp.0;
        fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        let mut cache = Cache::default();
        let mut model = new_model();
        let (n, names, _) = refresh(&mut cache, dir, &mut model);
        assert_eq!((n, names), (2, vec!["a".to_string(), "b".into()]));
        assert_eq!(
            refresh(&mut cache, dir, &mut model).0,
            0,
            "nothing changed, nothing reported"
        );
        // Renamed over with the same size: another inode.
        fs::write(dir.join(".b.tmp"), svc("c")).unwrap();
        fs::rename(dir.join(".b.tmp"), dir.join("b.yaml")).unwrap();
        let (n, names, _) = refresh(&mut cache, dir, &mut model);
        assert_eq!(
            (n, names),
            (2, vec!["a".to_string(), "c".into()]),
            "b gone, c new"
        );
        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::write(dir.join("d.yaml"), "kind: [").unwrap();
        // The same service in two files: the first file's wins, with a warning.
        fs::write(dir.join("e.yaml"), format!("{}---\n{}", svc("x"), svc("c"))).unwrap();
        let (_, names, warnings) = refresh(&mut cache, dir, &mut model);
        assert_eq!(names, ["c", "x"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("d.yaml: document 1: not valid YAML"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].starts_with("Service shop/c: defined more than once")
                && warnings[1].contains("b.yaml, document 1; ")
                && warnings[1].ends_with("e.yaml, document 2)"),
            "{warnings:?}"
        );
        assert_eq!(
            cache.origin(Kind::Service, &("shop".into(), "c".into())),
            Some(format!("{}, document 1", dir.join("b.yaml").display()))
        );
        fs::remove_file(dir.join("b.yaml")).unwrap();
        let (n, names, warnings) = refresh(&mut cache, dir, &mut model);
        assert_eq!(
            (n, names),
            (1, vec!["c".to_string(), "x".into()]),
            "e.yaml's copy takes over"
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(
            cache.origin(Kind::Service, &("shop".into(), "c".into())),
            Some(format!("{}, document 2", dir.join("e.yaml").display()))
        );
        assert_eq!(cache.origin(Kind::Node, &("".into(), "c".into())), None);
    }

    #[test]
    fn a_duplicate_inside_one_file_names_both_documents() {
        let mut loaded = Loaded::default();
        parse_into(
            &format!("{}---\n{}", svc("a"), svc("a")),
            "f.yaml",
            &mut loaded,
        );
        let e = FileEntry::from_loaded("f.yaml", None, loaded);
        assert_eq!(e.objects.len(), 1);
        assert_eq!(
            e.warnings,
            [
                "f.yaml: document 2: Service shop/a: defined more than once; the first \
              definition is used (document 1)"
            ]
        );
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects_then_recovers() {
        let tmp = TempDir::new("broken");
        let file = tmp.0.join("web.yaml");
        fs::write(&file, format!("{}---\n{}", svc("a"), svc("b"))).unwrap();
        let mut cache = Cache::default();
        let mut model = new_model();
        let (_, names, _) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!(names, ["a", "b"]);
        // Document 1 broken (its service renamed too): nothing changes.
        fs::write(
            &file,
            format!(
                "{}---\n{}",
                svc("z").replace("{name: z", "{name: [z"),
                svc("b")
            ),
        )
        .unwrap();
        let (n, names, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!((n, names), (0, vec!["a".to_string(), "b".into()]));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains(
            "web.yaml: document 1: not valid YAML: did not find expected ',' or ']' at line 3"
        ));
        assert!(
            warnings[1].ends_with(
                "web.yaml: document 1 broken: keeping the 2 objects of its last good version \
                 until it parses cleanly"
            ),
            "{warnings:?}"
        );
        assert_eq!(
            refresh(&mut cache, &tmp.0, &mut model).2,
            warnings,
            "the warnings stay while the file is broken"
        );
        // A bad field counts as broken too.
        fs::write(&file, svc("c").replace("port: 80", "port: eighty")).unwrap();
        let (n, names, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!((n, names), (0, vec!["a".to_string(), "b".into()]));
        assert!(
            warnings[0].contains("field spec.ports[0].port"),
            "{warnings:?}"
        );
        // Clean again: its objects replace the old ones.
        fs::write(&file, format!("{}---\n{}", svc("b"), svc("c"))).unwrap();
        let (n, names, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!((n, names), (3, vec!["b".to_string(), "c".into()]));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_file_truncated_to_empty_keeps_its_objects_and_a_deleted_one_removes_them() {
        let tmp = TempDir::new("empty");
        let file = tmp.0.join("web.yaml");
        fs::write(&file, svc("a")).unwrap();
        fs::write(tmp.0.join("new.yaml"), "").unwrap();
        let mut cache = Cache::default();
        let mut model = new_model();
        let (_, _, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert!(
            warnings.is_empty(),
            "a new empty file is no news: {warnings:?}"
        );
        fs::write(&file, "").unwrap();
        let (n, names, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!((n, names), (0, vec!["a".to_string()]));
        assert_eq!(
            warnings,
            [format!(
                "{}: empty (being written?): keeping the 1 objects of its last good version \
                 until it parses cleanly",
                file.display()
            )]
        );
        // A file that cannot be read keeps them too.
        fs::write(&file, b"\xff\xfe").unwrap();
        let (n, _, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!(n, 0);
        assert!(warnings[0].contains("cannot read"), "{warnings:?}");
        fs::remove_file(&file).unwrap();
        let (n, names, warnings) = refresh(&mut cache, &tmp.0, &mut model);
        assert_eq!((n, names), (1, Vec::<String>::new()));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_young_file_is_deferred_then_read() {
        let tmp = TempDir::new("young");
        let settle = Duration::from_secs(600);
        // Cold start: a file already old is read at once.
        tmp.write_old("a.yaml", &svc("a"));
        let mut cache = Cache::new(settle, Limits::default());
        let mut model = new_model();
        let now = SystemTime::now();
        let (_, names, _) = refresh_at(&mut cache, &tmp.0, &mut model, now);
        assert_eq!(names, ["a"]);
        // Written just now: not read yet, the old version stays.
        let a = tmp.0.join("a.yaml");
        fs::write(&a, "apiVersion: v1\nkind: Serv").unwrap();
        fs::write(tmp.0.join("b.yaml"), svc("b")).unwrap();
        let now = SystemTime::now();
        let (n, names, _) = refresh_at(&mut cache, &tmp.0, &mut model, now);
        assert_eq!((n, names), (0, vec!["a".to_string()]));
        // The writer finishes; once the settle time has passed, both are read.
        fs::write(&a, svc("c")).unwrap();
        let later = SystemTime::now() + settle;
        let (_, names, _) = refresh_at(&mut cache, &tmp.0, &mut model, later);
        assert_eq!(names, ["b", "c"]);
        // A modification time in the future does not hold a file back.
        fs::write(&a, svc("d")).unwrap();
        set_mtime(&a, SystemTime::now() + Duration::from_secs(3600));
        let (_, names, _) = refresh_at(&mut cache, &tmp.0, &mut model, SystemTime::now());
        assert_eq!(names, ["b", "d"]);
    }

    /// `n` Services, each followed by its EndpointSlice (one endpoint).
    fn services_and_slices(from: usize, n: usize) -> String {
        (from..from + n)
            .map(|i| {
                format!(
                    "---\n{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: s{i}-a, namespace: shop, labels: \
                     {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\n\
                     endpoints:\n- addresses: [10.244.{}.{}]\n",
                    svc(&format!("s{i}")),
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect()
    }

    #[test]
    fn the_first_read_in_parts_hands_over_what_a_refresh_reads() {
        let tmp = TempDir::new("parts");
        // Two parts and a bit in a.yaml; b.yaml redefines a.yaml's s0 (a.yaml's stays,
        // with a warning) and a.yaml defines s1 twice (the first stays); c.yaml is
        // still being written.
        let n = PART_DOCUMENTS / 2 + 5;
        let mut a = services_and_slices(0, n);
        a.push_str(&format!(
            "---\n{}",
            svc("s1").replace("10.96.0.10", "10.96.9.9")
        ));
        tmp.write_old("a.yaml", &a);
        tmp.write_old("b.yaml", &svc("s0").replace("10.96.0.10", "10.96.8.8"));
        fs::write(tmp.0.join("c.yaml"), svc("young")).unwrap();
        let settle = Duration::from_secs(600);
        let now = SystemTime::now();
        let (mut sizes, mut by_parts) = (Vec::new(), new_model());
        let mut first = Cache::new(settle, Limits::default());
        let (rest, warnings) = first
            .read_first(&tmp.0, now, |part| {
                sizes.push(part.len());
                part.into_iter().for_each(|c| by_parts.apply(c));
            })
            .unwrap();
        // The objects of every PART_DOCUMENTS documents as soon as they are parsed, each
        // object once (not the second s1, nor b.yaml's s0).
        assert_eq!(sizes, [PART_DOCUMENTS, 10]);
        assert!(rest.is_empty(), "{rest:?}");
        // The model fed the parts ends as one fed a refresh, with the same warnings.
        let (mut model, mut again) = (new_model(), Cache::new(settle, Limits::default()));
        let (_, _, refresh_warnings) = refresh_at(&mut again, &tmp.0, &mut model, now);
        assert_eq!(warnings, refresh_warnings);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        by_parts.update();
        model.update();
        assert_eq!(by_parts.service_count(), n);
        assert_eq!(by_parts.desired(), model.desired());
        // Afterwards the cache is as a refresh leaves it: nothing new but the young file.
        let later = now + settle;
        let (changes, _) = first.refresh(&tmp.0, later).unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
    }

    #[test]
    fn the_poller_reports_a_written_file_once_it_settled_and_a_removed_one_at_once() {
        let tmp = TempDir::new("settled");
        let settle = Duration::from_secs(600);
        let limits = Limits::default();
        tmp.write_old("a.yaml", &svc("a"));
        let mut view = Settled::default();
        let now = SystemTime::now();
        assert!(view.observe(&tmp.0, &limits, settle, now), "the first look");
        assert!(!view.observe(&tmp.0, &limits, settle, now));
        // Being written: no news yet, for a new file or a known one.
        fs::write(tmp.0.join("b.yaml"), svc("b")).unwrap();
        fs::write(tmp.0.join("a.yaml"), svc("a2")).unwrap();
        assert!(!view.observe(&tmp.0, &limits, settle, SystemTime::now()));
        assert_eq!(view.young(), 2);
        let later = SystemTime::now() + settle;
        assert!(view.observe(&tmp.0, &limits, settle, later), "settled");
        assert_eq!(view.young(), 0);
        assert!(!view.observe(&tmp.0, &limits, settle, later));
        fs::remove_file(tmp.0.join("b.yaml")).unwrap();
        assert!(view.observe(&tmp.0, &limits, settle, later), "removed");
    }

    #[test]
    fn a_file_noted_whole_is_read_at_once_until_written_again() {
        let tmp = TempDir::new("complete");
        let settle = Duration::from_secs(600);
        let limits = Limits::default();
        let complete = Complete::default();
        let mut view = Settled::with_complete(complete.clone());
        let mut cache = Cache::new(settle, limits).with_complete(complete.clone());
        let now = SystemTime::now();
        assert!(view.observe(&tmp.0, &limits, settle, now), "the first look");
        // Young, and not noted: neither the view nor the cache takes it.
        let a = tmp.0.join("a.yaml");
        fs::write(&a, svc("a")).unwrap();
        assert!(!view.observe(&tmp.0, &limits, settle, SystemTime::now()));
        assert!(
            cache
                .refresh(&tmp.0, SystemTime::now())
                .unwrap()
                .0
                .is_empty()
        );
        // Noted whole (renamed into place, or closed by its writer): taken at once.
        complete.mark(&a);
        assert!(view.observe(&tmp.0, &limits, settle, SystemTime::now()));
        assert_eq!(view.young(), 0);
        let (changes, _) = cache.refresh(&tmp.0, SystemTime::now()).unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        // Written again (another size) since it was noted: young again, kept as read.
        fs::write(&a, format!("{}\n", svc("a2"))).unwrap();
        assert!(!view.observe(&tmp.0, &limits, settle, SystemTime::now()));
        assert_eq!(view.young(), 1);
        assert!(
            cache
                .refresh(&tmp.0, SystemTime::now())
                .unwrap()
                .0
                .is_empty()
        );
    }

    #[test]
    fn directory_is_read_recursively_in_order_and_hidden_files_skipped() {
        let tmp = TempDir::new("tree");
        let dir = &tmp.0;
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        fs::write(dir.join("sub/a.yml"), svc("a")).unwrap();
        fs::write(dir.join(".hidden.yaml"), svc("h")).unwrap();
        fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let l = load(dir).unwrap();
        assert_eq!(names(&l), ["b", "a"]);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        fs::remove_dir_all(dir).unwrap();
        assert!(matches!(load(dir), Err(ManifestError::Io { .. })));
    }

    #[test]
    fn a_symlink_loop_is_read_once_with_a_warning() {
        let tmp = TempDir::new("loop");
        let dir = &tmp.0;
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        fs::write(dir.join("sub/b.yaml"), svc("b")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("sub", dir.join("z-again")).unwrap();
        // A symlinked file is read.
        std::os::unix::fs::symlink("sub/b.yaml", dir.join("c.yaml")).unwrap();
        let walk = walk(dir, &Limits::default()).unwrap();
        assert_eq!(
            walk.files,
            [
                dir.join("a.yaml"),
                dir.join("c.yaml"),
                dir.join("sub/b.yaml")
            ]
        );
        assert_eq!(walk.warnings.len(), 2, "{:?}", walk.warnings);
        assert_eq!(
            walk.warnings[0],
            format!(
                "{}: the directory {} again (a symlink loop or a second link); skipped",
                dir.join("sub/up").display(),
                dir.display()
            )
        );
        assert!(
            walk.warnings[1]
                .starts_with(&format!("{}: the directory", dir.join("z-again").display()))
        );
        let l = load(dir).unwrap();
        assert_eq!(names(&l), ["a", "b", "b"]);
    }

    #[test]
    fn depth_size_and_count_limits_skip_with_a_warning() {
        let tmp = TempDir::new("limits");
        let dir = &tmp.0;
        fs::create_dir_all(dir.join("d1/d2/d3")).unwrap();
        fs::write(dir.join("d1/d2/ok.yaml"), svc("ok")).unwrap();
        fs::write(dir.join("d1/d2/d3/deep.yaml"), svc("deep")).unwrap();
        let limits = Limits {
            depth: 2,
            file_bytes: 1000,
            files: 3,
        };
        let w = walk(dir, &limits).unwrap();
        assert_eq!(w.files, [dir.join("d1/d2/ok.yaml")]);
        assert_eq!(
            w.warnings,
            [format!(
                "{}: more than 2 directories below {}; skipped",
                dir.join("d1/d2/d3").display(),
                dir.display()
            )]
        );
        fs::remove_dir_all(dir.join("d1")).unwrap();
        for name in ["a", "b", "c", "d", "e"] {
            tmp.write_old(&format!("{name}.yaml"), &svc(name));
        }
        let w = walk(dir, &limits).unwrap();
        assert_eq!(w.files.len(), 3);
        assert_eq!(
            w.warnings,
            [format!(
                "{}: more than 3 manifest files under {}; this file and the ones after it \
                 skipped",
                dir.join("d.yaml").display(),
                dir.display()
            )]
        );
        // Size: a file over the limit is not read (and, once read, keeps its objects).
        let mut cache = Cache::new(Duration::ZERO, limits);
        let mut model = new_model();
        fs::write(dir.join("a.yaml"), "#".repeat(1001)).unwrap();
        let (_, names, warnings) = refresh(&mut cache, dir, &mut model);
        assert_eq!(names, ["b", "c"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert_eq!(
            warnings[1],
            format!(
                "{}: larger than the limit of 1000 bytes per file; skipped",
                dir.join("a.yaml").display()
            )
        );
        fs::write(dir.join("b.yaml"), "#".repeat(1001)).unwrap();
        let (n, names, _) = refresh(&mut cache, dir, &mut model);
        assert_eq!((n, names), (0, vec!["b".to_string(), "c".into()]));
    }

    #[test]
    fn the_repository_manifests_load_cleanly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let l = load(&root).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // web, web-pods (headless), api, docs (ExternalName), kube-dns, ingress; the
        // Ingress object is the demo proxy's, not ours.
        assert_eq!(l.objects.services.len(), 6, "the demo's services");
        assert_eq!(
            l.objects.slices.len(),
            5,
            "every Service but the ExternalName one"
        );
    }
}
