//! The manifest source: Service, EndpointSlice and Node objects read from a YAML file or a
//! directory of them, in the shape `kubectl get -o yaml` prints (multi-document YAML and
//! `kind: List` included).
//!
//! A document that cannot be read is skipped with a warning naming the file, the
//! document, the object and the field; everything else is still loaded.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize as _;

use crate::model::{
    Change, Kind, ObjKey, Object, Objects, Slice, duplicate_warning, slice::slim_meta,
};

/// Errors that stop a whole load: the path itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifests path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything read from a manifest path, with one warning per skipped document or object.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Objects,
    pub warnings: Vec<String>,
}

/// The files `load` reads: the path itself, or the `*.yaml`, `*.yml` and `*.json` files
/// under a directory (recursively, hidden entries skipped), in name order.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).map_err(|source| ManifestError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
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
    fn of(file: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::metadata(file).ok()?;
        Some(Self {
            len: meta.len(),
            ino: meta.ino(),
            mtime: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// A cheap summary of the manifest files that changes when any of them is written,
/// added, removed or renamed over.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<Stamp>)> {
    manifest_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let stamp = Stamp::of(&f);
            (f, stamp)
        })
        .collect()
}

/// Reads every object under `path`.
pub fn load(path: &Path) -> Result<Loaded, ManifestError> {
    let mut loaded = Loaded::default();
    for file in manifest_files(path)? {
        match fs::read_to_string(&file) {
            Ok(text) => parse_into(&text, &file.display().to_string(), &mut loaded),
            Err(e) => loaded
                .warnings
                .push(format!("{}: cannot read: {e}; skipped", file.display())),
        }
    }
    Ok(loaded)
}

type Id = (Kind, ObjKey);

/// One file as last read.
#[derive(Debug)]
struct FileEntry {
    stamp: Option<Stamp>,
    /// Its objects sorted by [`Object::id`], one of each (the first definition).
    objects: Vec<Object>,
    warnings: Vec<String>,
}

impl FileEntry {
    fn read(file: &Path, stamp: Option<Stamp>) -> Self {
        let mut loaded = Loaded::default();
        match fs::read_to_string(file) {
            Ok(text) => parse_into(&text, &file.display().to_string(), &mut loaded),
            Err(e) => loaded
                .warnings
                .push(format!("{}: cannot read: {e}; skipped", file.display())),
        }
        let Loaded {
            objects,
            mut warnings,
        } = loaded;
        // A saved object's resourceVersion and uid say nothing about a file's edits:
        // dropped, so that a changed file is compared by content.
        let unversioned = |m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.resource_version = None;
            m.uid = None;
        };
        let mut all: Vec<Object> = (objects.services.into_iter())
            .map(|mut o| {
                slim_meta(&mut o.metadata);
                unversioned(&mut o.metadata);
                Object::Service(Arc::new(o))
            })
            .chain(objects.slices.into_iter().map(|o| {
                let mut o = o.slim();
                unversioned(&mut o.metadata);
                Object::EndpointSlice(Arc::new(o))
            }))
            .chain(objects.nodes.into_iter().map(|mut o| {
                unversioned(&mut o.metadata);
                Object::Node(Arc::new(o))
            }))
            .collect();
        // Stable: of two definitions, the first stays first.
        all.sort_by(|a, b| a.id().cmp(&b.id()));
        all.dedup_by(|later, first| {
            let dup = later.id() == first.id();
            if dup {
                let dup = duplicate_warning(later.kind(), &later.key());
                warnings.push(format!("{}: {dup}", file.display()));
            }
            dup
        });
        all.shrink_to_fit();
        Self {
            stamp,
            objects: all,
            warnings,
        }
    }

    fn get(&self, id: &Id) -> Option<&Object> {
        let want = (id.0, id.1.0.as_str(), id.1.1.as_str());
        let i = self.objects.binary_search_by(|o| o.id().cmp(&want)).ok()?;
        Some(&self.objects[i])
    }
}

/// The manifest source's memory: each file's objects, parsed again only when the file
/// changed, and the changes that makes to the whole set (an object defined in several
/// files: the first file in name order wins, with a warning).
#[derive(Debug, Default)]
pub struct Cache {
    files: BTreeMap<PathBuf, FileEntry>,
    /// The objects defined in more than one file.
    duplicated: BTreeSet<Id>,
}

impl Cache {
    /// Reads what changed under `path` since the last call and returns it as changes,
    /// with the warnings of every file (not only the changed ones).
    pub fn refresh(&mut self, path: &Path) -> Result<(Vec<Change>, Vec<String>), ManifestError> {
        let mut seen = BTreeMap::new();
        let mut touched: BTreeSet<Id> = BTreeSet::new();
        let ids = |e: &FileEntry| {
            e.objects
                .iter()
                .map(|o| (o.kind(), o.key()))
                .collect::<Vec<_>>()
        };
        for file in manifest_files(path)? {
            let stamp = Stamp::of(&file);
            let entry = match self.files.remove(&file) {
                Some(e) if e.stamp == stamp && stamp.is_some() => e,
                old => {
                    let new = FileEntry::read(&file, stamp);
                    touched.extend(old.iter().flat_map(ids));
                    touched.extend(ids(&new));
                    new
                }
            };
            seen.insert(file, entry);
        }
        for old in std::mem::replace(&mut self.files, seen).values() {
            touched.extend(ids(old));
        }
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
        let mut warnings: Vec<String> = self
            .files
            .values()
            .flat_map(|f| f.warnings.iter().cloned())
            .collect();
        for id @ (kind, key) in &self.duplicated {
            let names: Vec<String> = self
                .files
                .iter()
                .filter(|(_, f)| f.get(id).is_some())
                .map(|(name, _)| name.display().to_string())
                .collect();
            warnings.push(format!(
                "{} (in {})",
                duplicate_warning(*kind, key),
                names.join(", ")
            ));
        }
        Ok((changes, warnings))
    }
}

/// Parses one file's text (multi-document YAML or JSON) into `loaded`.
pub fn parse_into(text: &str, origin: &str, loaded: &mut Loaded) {
    match parse_fast(text) {
        Some(objects) => {
            loaded.objects.services.extend(objects.services);
            loaded.objects.slices.extend(objects.slices);
            loaded.objects.nodes.extend(objects.nodes);
        }
        None => parse_checked(text, origin, loaded),
    }
}

/// The fast path for the usual file: block-style documents, each with a top-level
/// `apiVersion:` and `kind:` line, read straight into their types. (One thread: with the
/// agent's single malloc heap, two parsing threads spend more time waiting for each
/// other's allocations than they save.) `None` as soon as anything is unusual or does not parse: the caller then
/// reads the file with [`parse_checked`], which names what is wrong and where.
fn parse_fast(text: &str) -> Option<Objects> {
    let mut objects = Objects::default();
    for doc in split_documents(text)? {
        match type_of(doc)? {
            ("v1", "Service") => objects.services.push(serde_yaml::from_str(doc).ok()?),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                objects.slices.push(serde_yaml::from_str(doc).ok()?)
            }
            ("v1", "Node") => objects.nodes.push(serde_yaml::from_str(doc).ok()?),
            (_, "List") => return None,
            _ => {} // Not used (the checked path logs it at debug level).
        }
    }
    Some(objects)
}

/// The documents of a YAML stream split at `---` lines; `None` for directives, document
/// end markers or anything else the split cannot be sure of.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') || line.starts_with("...") || line.starts_with('\t') {
            return None;
        }
        if let Some(rest) = line.strip_prefix("---") {
            if !rest.trim().is_empty() {
                return None; // Content after the marker.
            }
            docs.push(&text[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    Some(docs)
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

/// Parses one file's text document by document, with a warning naming the document, the
/// object and the field for everything skipped.
fn parse_checked(text: &str, origin: &str, loaded: &mut Loaded) {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{origin}: document {}", index + 1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => add_object(value, &where_, loaded),
            Err(e) => {
                loaded
                    .warnings
                    .push(format!("{where_}: not valid YAML: {e}; skipped"));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        }
    }
}

fn field<'a>(value: &'a serde_yaml::Value, name: &str) -> Option<&'a str> {
    value.get(name).and_then(|v| v.as_str())
}

fn add_object(value: serde_yaml::Value, where_: &str, loaded: &mut Loaded) {
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
    match (api_version.as_str(), kind.as_str()) {
        (_, "List") => match value.get("items").cloned() {
            Some(serde_yaml::Value::Sequence(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    add_object(item, &format!("{where_}: items[{i}]"), loaded);
                }
            }
            None | Some(serde_yaml::Value::Null) => {}
            Some(_) => loaded
                .warnings
                .push(format!("{where_}: List: field items: not a list; skipped")),
        },
        ("v1", "Service") => {
            if let Some(svc) = decode::<Service>(value, where_, "Service", &name, loaded) {
                loaded.objects.services.push(svc);
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(slice) = decode::<Slice>(value, where_, "EndpointSlice", &name, loaded) {
                loaded.objects.slices.push(slice);
            }
        }
        ("v1", "Node") => {
            if let Some(node) = decode::<Node>(value, where_, "Node", &name, loaded) {
                loaded.objects.nodes.push(node);
            }
        }
        ("", "") => loaded.warnings.push(format!(
            "{where_}: no apiVersion and kind: not a Kubernetes object; skipped"
        )),
        _ => tracing::debug!("{where_}: {api_version} {kind} {name}: not used; skipped"),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    where_: &str,
    kind: &str,
    name: &str,
    loaded: &mut Loaded,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(obj) => Some(obj),
        Err(e) => {
            loaded.warnings.push(format!(
                "{where_}: {kind} {name}: field {}: {}; skipped",
                e.path(),
                e.inner()
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loaded {
        let mut loaded = Loaded::default();
        parse_into(text, "test.yaml", &mut loaded);
        loaded
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
    }

    #[test]
    fn bad_field_names_object_and_field_and_keeps_the_rest() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: ns1}}\n\
             spec:\n  ports: [{{port: eighty}}]\n---\n{SVC}"
        );
        let l = parse(&text);
        assert_eq!(l.objects.services.len(), 1, "the good service is kept");
        assert_eq!(l.warnings.len(), 1);
        let w = &l.warnings[0];
        assert!(w.contains("test.yaml: document 1"), "{w}");
        assert!(w.contains("Service ns1/bad"), "{w}");
        assert!(w.contains("spec.ports[0].port"), "{w}");
    }

    #[test]
    fn other_kinds_are_skipped_quietly_and_non_objects_warn() {
        let l = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n42\n");
        assert!(l.objects.services.is_empty());
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("document 2"));
    }

    #[test]
    fn broken_yaml_warns_with_file_name() {
        let l = parse("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].starts_with("test.yaml: document 1: not valid YAML"));
    }

    #[test]
    fn cache_reports_changed_files_only_and_forgets_removed_ones() {
        let dir = std::env::temp_dir().join(format!("lb-manifest-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), SVC.replace("web", "a")).unwrap();
        fs::write(dir.join("b.yaml"), SVC.replace("web", "b")).unwrap();
        let mut cache = Cache::default();
        let mut model = crate::model::Model::new(None, Vec::new());
        let mut refresh = |model: &mut crate::model::Model| {
            let (changes, warnings) = cache.refresh(&dir).unwrap();
            let n = changes.len();
            for c in changes {
                model.apply(c);
            }
            let names: Vec<String> = model
                .objects()
                .services
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect();
            (n, names, warnings)
        };
        let (n, names, _) = refresh(&mut model);
        assert_eq!((n, names), (2, vec!["a".to_string(), "b".into()]));
        assert_eq!(
            refresh(&mut model).0,
            0,
            "nothing changed, nothing reported"
        );
        // Renamed over with the same size: another inode.
        fs::write(dir.join(".b.tmp"), SVC.replace("web", "c")).unwrap();
        fs::rename(dir.join(".b.tmp"), dir.join("b.yaml")).unwrap();
        let (n, names, _) = refresh(&mut model);
        assert_eq!(
            (n, names),
            (2, vec!["a".to_string(), "c".into()]),
            "b gone, c new"
        );
        fs::remove_file(dir.join("a.yaml")).unwrap();
        fs::write(dir.join("d.yaml"), "kind: [").unwrap();
        // The same service in two files: the first file's wins, with a warning.
        fs::write(dir.join("e.yaml"), SVC.replace("web", "c")).unwrap();
        let (_, names, warnings) = refresh(&mut model);
        assert_eq!(names, ["c"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[1].starts_with("Service shop/c: defined more than once")
                && warnings[1].contains("b.yaml, ")
                && warnings[1].ends_with("e.yaml)"),
            "{warnings:?}"
        );
        fs::remove_file(dir.join("b.yaml")).unwrap();
        let (n, names, warnings) = refresh(&mut model);
        assert_eq!(
            (n, names),
            (1, vec!["c".to_string()]),
            "e.yaml's copy takes over"
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directory_is_read_recursively_in_order_and_hidden_files_skipped() {
        let dir = std::env::temp_dir().join(format!("lb-manifest-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("b.yaml"), SVC.replace("web", "b")).unwrap();
        fs::write(dir.join("sub/a.yml"), SVC.replace("web", "a")).unwrap();
        fs::write(dir.join(".hidden.yaml"), SVC.replace("web", "h")).unwrap();
        fs::write(dir.join("notes.txt"), "not yaml").unwrap();
        let l = load(&dir).unwrap();
        let names: Vec<_> = l
            .objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["b", "a"]);
        let before = fingerprint(&dir);
        fs::write(dir.join("c.yaml"), SVC).unwrap();
        assert_ne!(before, fingerprint(&dir));
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(load(&dir), Err(ManifestError::Io { .. })));
    }

    #[test]
    fn the_repository_manifests_load_cleanly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
        let l = load(&root).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.objects.services.len(), 2, "the demo's services");
        assert_eq!(l.objects.slices.len(), 2);
    }
}
