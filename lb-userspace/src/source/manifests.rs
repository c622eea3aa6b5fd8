//! `--manifests DIR`: Service and EndpointSlice objects from YAML/JSON files, re-read when
//! files change. A file that fails to parse keeps its last good objects.
use std::{
    collections::BTreeMap,
    fmt,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;

use super::{
    compact::Compact,
    validate::{self, Validate},
};
use crate::translate::Objects;

/// An object as it is kept: compacted and shared.
fn compacted<T: Compact>(mut object: T) -> Arc<T> {
    object.compact();
    Arc::new(object)
}

/// A Service or EndpointSlice as it is kept: validated as the API server would (refusals
/// reported with the file), compacted and shared.
fn admitted<T: Compact + Validate + kube::Resource>(mut object: T, path: &Path) -> Arc<T> {
    validate::check(&mut object, &path.display().to_string());
    compacted(object)
}

/// A file that could not be used, with where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub path: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Kinds we read; anything else is skipped.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
    List,
    Other,
}

fn kind_of(api_version: Option<&str>, kind: Option<&str>) -> Kind {
    match (api_version, kind) {
        (Some("v1"), Some("Service")) => Kind::Service,
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => Kind::EndpointSlice,
        (Some("v1"), Some("Node")) => Kind::Node,
        (Some("v1"), Some("List")) => Kind::List,
        _ => Kind::Other,
    }
}

/// Parses one file's text. `json` selects the JSON parser (else YAML, multi-document).
pub fn parse_file_text(text: &str, path: &Path, json: bool) -> Result<Objects, ManifestError> {
    let mut objects = Objects::default();
    if json {
        parse_json(text, path, &mut objects)?;
    } else {
        parse_yaml(text, path, &mut objects)?;
    }
    Ok(objects)
}

fn yaml_error(path: &Path, err: &serde_saphyr::Error) -> ManifestError {
    let (line, column) = err
        .location()
        .map(|l| (l.line() as usize, l.column() as usize))
        .unwrap_or((0, 0));
    ManifestError {
        path: path.to_path_buf(),
        line,
        column,
        message: err.to_string(),
    }
}

/// What a document says it is, and where it starts.
#[derive(serde::Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    /// Any shape: only Services and EndpointSlices are held to it (their typed read).
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Metadata as written: label and annotation values with their YAML types (the typed read
/// would turn `1` or `true` into strings the API server refuses).
#[derive(serde::Deserialize, Default)]
struct HeaderMeta {
    name: Option<serde_json::Value>,
    namespace: Option<serde_json::Value>,
    #[serde(default)]
    labels: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, serde_json::Value>>,
}

impl HeaderMeta {
    /// The first label or annotation whose value is not a string, as the API refuses it.
    fn non_string_value(&self) -> Option<(String, &serde_json::Value)> {
        for (field, map) in [("labels", &self.labels), ("annotations", &self.annotations)] {
            if let Some((key, value)) = map.iter().flatten().find(|(_, v)| !v.is_string()) {
                return Some((format!("metadata.{field}.{key}"), value));
            }
        }
        None
    }

    fn shown_name(&self) -> String {
        let text = |v: &Option<serde_json::Value>, default: &str| {
            v.as_ref()
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_string()
        };
        format!(
            "{}/{}",
            text(&self.namespace, "default"),
            text(&self.name, "")
        )
    }
}

/// One document, deserialized as the type its header named, straight from the YAML stream
/// (so a type error carries its line and column in the file).
enum Document {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    List(Vec<serde_json::Value>),
    Other,
}

std::thread_local! {
    /// The kinds of the documents still to be read, from the header pass: serde-saphyr reads
    /// every document as one type, and this tells that type which one each document is.
    static KINDS: std::cell::RefCell<std::collections::VecDeque<Kind>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

impl<'de> serde::Deserialize<'de> for Document {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct ListItems {
            #[serde(default)]
            items: Vec<serde_json::Value>,
        }
        match KINDS.with(|k| k.borrow_mut().pop_front()) {
            Some(Kind::Service) => Ok(Document::Service(serde::Deserialize::deserialize(d)?)),
            Some(Kind::EndpointSlice) => {
                Ok(Document::EndpointSlice(serde::Deserialize::deserialize(d)?))
            }
            Some(Kind::Node) => Ok(Document::Node(serde::Deserialize::deserialize(d)?)),
            Some(Kind::List) => Ok(Document::List(ListItems::deserialize(d)?.items)),
            Some(Kind::Other) | None => {
                serde::de::IgnoredAny::deserialize(d)?;
                Ok(Document::Other)
            }
        }
    }
}

/// Multi-document YAML: a header pass (kinds and positions), then each document read as its
/// kind. Empty and comment-only documents are skipped by serde-saphyr in both passes alike.
fn parse_yaml(text: &str, path: &Path, objects: &mut Objects) -> Result<(), ManifestError> {
    let headers: Vec<serde_saphyr::Spanned<Header>> =
        serde_saphyr::from_multiple(text).map_err(|e| yaml_error(path, &e))?;
    let kinds: std::collections::VecDeque<Kind> = headers
        .iter()
        .map(|h| kind_of(h.value.api_version.as_deref(), h.value.kind.as_deref()))
        .collect();
    KINDS.with(|k| *k.borrow_mut() = kinds);
    let documents = serde_saphyr::from_multiple::<Document>(text);
    KINDS.with(|k| k.borrow_mut().clear());
    let documents = documents.map_err(|e| yaml_error(path, &e))?;
    for (document, header) in documents.into_iter().zip(&headers) {
        let line = header.defined.line() as usize;
        let meta: HeaderMeta = header
            .value
            .metadata
            .clone()
            .and_then(|m| serde_json::from_value(m).ok())
            .unwrap_or_default();
        if let (Some((field, value)), Some(kind)) = (
            meta.non_string_value(),
            match document {
                Document::Service(_) => Some("Service"),
                Document::EndpointSlice(_) => Some("EndpointSlice"),
                _ => None,
            },
        ) {
            validate::record(
                &format!("{}:{line}", path.display()),
                &meta.shown_name(),
                &validate::Rejection {
                    kind,
                    field,
                    reason: "value_type",
                    message: format!("{value} is not a string; object ignored"),
                    object: true,
                },
            );
            continue;
        }
        match document {
            Document::Service(service) => objects.services.push(admitted(*service, path)),
            Document::EndpointSlice(slice) => objects.slices.push(admitted(*slice, path)),
            Document::Node(node) => objects.nodes.push(compacted(*node)),
            Document::List(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    add_list_item(item, i, line, path, objects)?;
                }
            }
            Document::Other => log::debug!(
                "{}:{line}: skipping {:?} {:?}",
                path.display(),
                header.value.api_version,
                header.value.kind
            ),
        }
    }
    Ok(())
}

fn parse_json(text: &str, path: &Path, objects: &mut Objects) -> Result<(), ManifestError> {
    let json_error = |e: serde_json::Error| ManifestError {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(json_error)?;
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    match kind_of(field("apiVersion"), field("kind")) {
        Kind::Service => objects.services.push(admitted::<Service>(
            serde_json::from_str(text).map_err(json_error)?,
            path,
        )),
        Kind::EndpointSlice => objects.slices.push(admitted::<EndpointSlice>(
            serde_json::from_str(text).map_err(json_error)?,
            path,
        )),
        Kind::Node => objects
            .nodes
            .push(compacted(serde_json::from_str(text).map_err(json_error)?)),
        Kind::List => {
            let items = value.get("items").and_then(serde_json::Value::as_array);
            for (i, item) in items.into_iter().flatten().enumerate() {
                add_list_item(item.clone(), i, 1, path, objects)?;
            }
        }
        Kind::Other => log::debug!(
            "{}: skipping non-Service/EndpointSlice object",
            path.display()
        ),
    }
    Ok(())
}

fn add_list_item(
    item: serde_json::Value,
    index: usize,
    line: usize,
    path: &Path,
    objects: &mut Objects,
) -> Result<(), ManifestError> {
    fn typed<T: DeserializeOwned>(
        item: serde_json::Value,
        index: usize,
        line: usize,
        path: &Path,
    ) -> Result<T, ManifestError> {
        serde_json::from_value(item).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            line,
            column: 0,
            message: format!("items[{index}]: {e}"),
        })
    }
    let field = |name: &str| item.get(name).and_then(serde_json::Value::as_str);
    match kind_of(field("apiVersion"), field("kind")) {
        Kind::Service => objects
            .services
            .push(admitted(typed::<Service>(item, index, line, path)?, path)),
        Kind::EndpointSlice => objects.slices.push(admitted(
            typed::<EndpointSlice>(item, index, line, path)?,
            path,
        )),
        Kind::Node => objects
            .nodes
            .push(compacted(typed::<Node>(item, index, line, path)?)),
        Kind::List | Kind::Other => {}
    }
    Ok(())
}

/// Identity of a file's content as far as the filesystem tells: changes when it is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    size: u64,
    inode: u64,
}

#[derive(Debug)]
struct LoadedFile {
    stamp: Stamp,
    /// Last objects that parsed (kept while the file is broken).
    objects: Objects,
}

/// What one rescan found.
#[derive(Debug, Default)]
pub struct Rescan {
    /// The set of objects changed: translate and sync again.
    pub changed: bool,
    /// Files that failed to parse in this rescan (each reported once per version of the file).
    pub errors: Vec<ManifestError>,
}

/// A watched manifests directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, LoadedFile>,
    /// Entries that could not be followed (a symlink loop, a dangling link), reported once.
    unreadable: std::collections::BTreeSet<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read manifests directory {dir}: {source}")]
pub struct DirError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            unreadable: std::collections::BTreeSet::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files that were added or rewritten and forgets removed ones.
    pub fn rescan(&mut self) -> Result<Rescan, DirError> {
        let dir_err = |source| DirError {
            dir: self.dir.clone(),
            source,
        };
        let mut seen = BTreeMap::new();
        let mut result = Rescan::default();
        let mut unreadable = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir).map_err(dir_err)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            // Follow symlinks (ConfigMap mounts are symlink farms).
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    if !self.unreadable.contains(&path) {
                        result.errors.push(ManifestError {
                            path: path.clone(),
                            line: 0,
                            column: 0,
                            message: format!("cannot follow: {e}; skipped"),
                        });
                    }
                    unreadable.insert(path);
                    continue;
                }
            };
            if meta.is_file() {
                let stamp = Stamp {
                    mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                        + i128::from(meta.mtime_nsec()),
                    size: meta.size(),
                    inode: meta.ino(),
                };
                seen.insert(path, stamp);
            }
        }
        self.unreadable = unreadable;
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains_key(path));
        result.changed |= self.files.len() != before;
        for (path, stamp) in seen {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| ManifestError {
                    path: path.clone(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                })
                .and_then(|text| {
                    let json = path.extension().is_some_and(|e| e == "json");
                    parse_file_text(&text, &path, json)
                });
            match parsed {
                Ok(objects) => {
                    self.files.insert(path, LoadedFile { stamp, objects });
                    result.changed = true;
                }
                Err(err) => {
                    result.errors.push(err);
                    // Keep the last good objects; remember the stamp so the error is reported
                    // once per version of the file, not on every scan.
                    let kept = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(
                        path,
                        LoadedFile {
                            stamp,
                            objects: kept,
                        },
                    );
                }
            }
        }
        Ok(result)
    }

    /// All objects of all files.
    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for file in self.files.values() {
            all.services.extend(file.objects.services.iter().cloned());
            all.slices.extend(file.objects.slices.iter().cloned());
            all.nodes.extend(file.objects.nodes.iter().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, json: bool) -> ManifestError {
        parse_file_text(text, Path::new("/m/x.yaml"), json).expect_err("must fail")
    }

    #[test]
    fn multi_document_yaml_with_other_kinds_and_comments() {
        let text = "# leading comment\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n\
                    ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n# only a comment\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1}\naddressType: IPv4\nendpoints: []\n";
        let objects = parse_file_text(text, Path::new("x.yaml"), false).expect("parses");
        assert_eq!((objects.services.len(), objects.slices.len()), (1, 1));
    }

    #[test]
    fn yaml_syntax_error_reports_file_line_and_column() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n";
        let e = err(text, false);
        assert_eq!(e.path, PathBuf::from("/m/x.yaml"));
        assert!(e.line >= 8, "line of the second document's error, got {e}");
        assert!(e.to_string().starts_with("/m/x.yaml:"));
    }

    #[test]
    fn yaml_type_error_reports_line_in_its_document() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  ports:\n  - port: eighty\n";
        let e = err(text, false);
        assert_eq!(e.line, 10, "{e}");
        assert!(
            e.message.contains("eighty") || e.message.contains("invalid"),
            "{e}"
        );
    }

    #[test]
    fn json_errors_and_lists() {
        let e = err(
            "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Service\",\n  \"spec\": 5\n}",
            true,
        );
        assert_eq!((e.line, e.column), (4, 11), "{e}");
        let list = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.1"}},
            {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"a-1"},"addressType":"IPv4","endpoints":[]}]}"#;
        let objects = parse_file_text(list, Path::new("l.json"), true).expect("parses");
        assert_eq!((objects.services.len(), objects.slices.len()), (1, 1));
    }

    #[test]
    fn directory_keeps_last_good_state_of_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("xlb-manifests-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        std::fs::write(dir.join("a.yaml"), good).expect("write");
        std::fs::write(dir.join("notes.txt"), "ignored").expect("write");
        let mut md = ManifestDir::new(&dir);
        let r = md.rescan().expect("scan");
        assert!(r.changed && r.errors.is_empty());
        assert_eq!(md.objects().services.len(), 1);
        assert!(!md.rescan().expect("scan").changed, "no change, no resync");

        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nspec: [\n",
        )
        .expect("write");
        let r = md.rescan().expect("scan");
        assert_eq!(r.errors.len(), 1);
        assert_eq!(md.objects().services.len(), 1, "last good objects kept");
        assert!(
            md.rescan().expect("scan").errors.is_empty(),
            "error reported once"
        );

        std::fs::remove_file(dir.join("a.yaml")).expect("rm");
        let r = md.rescan().expect("scan");
        assert!(r.changed);
        assert!(md.objects().services.is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(
            ManifestDir::new(&dir).rescan().is_err(),
            "missing dir is an error"
        );
    }

    #[test]
    fn a_symlink_loop_is_reported_once_and_the_rest_still_read() {
        let dir = std::env::temp_dir().join(format!("xlb-manifests-loop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        std::os::unix::fs::symlink(dir.join("b.yaml"), dir.join("a.yaml")).expect("link");
        std::os::unix::fs::symlink(dir.join("a.yaml"), dir.join("b.yaml")).expect("link");
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        std::fs::write(dir.join("c.yaml"), good).expect("write");
        let mut md = ManifestDir::new(&dir);
        let r = md.rescan().expect("scan");
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert!(
            r.errors.iter().all(|e| e.message.contains("cannot follow")),
            "{:?}",
            r.errors
        );
        assert_eq!(md.objects().services.len(), 1);
        assert!(
            md.rescan().expect("scan").errors.is_empty(),
            "reported once"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn non_string_label_values_refuse_the_object() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, labels: {x: 1}}\n\
                    spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: b, labels: {x: '1'}}\n\
                    spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        let objects = parse_file_text(text, Path::new("l.yaml"), false).expect("parses");
        let names: Vec<_> = objects
            .services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names, ["b"], "the numeric label value refuses a");
    }

    #[test]
    fn invalid_objects_from_the_issue_are_refused_or_trimmed() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: zero, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.1, ports: [{name: a, port: 0}, {name: b, port: 80}]}\n---\n\
                    apiVersion: v1\nkind: Service\nmetadata: {name: neg, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.2, sessionAffinity: ClientIP, \
                    sessionAffinityConfig: {clientIP: {timeoutSeconds: -1}}, ports: [{port: 80}]}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: zero-1, namespace: shop, labels: {kubernetes.io/service-name: zero}}\n\
                    addressType: IPv4\nports: [{name: b, port: 70000}, {name: b, port: 8080}]\n\
                    endpoints: [{addresses: ['::1']}, {addresses: [10.244.1.300]}, {addresses: [10.244.1.2]}]\n";
        let objects = parse_file_text(text, Path::new("/m/bad.yaml"), false).expect("parses");
        let zero = &objects.services[0];
        let ports = zero
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(Vec::len);
        assert_eq!(ports, Some(1), "port 0 dropped, port 80 kept");
        assert!(
            objects.services[1].spec.is_none(),
            "negative timeoutSeconds: refused"
        );
        let slice = &objects.slices[0];
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.ports.as_ref().map(Vec::len), Some(1));
        let t = crate::translate::translate(&objects, &Default::default());
        assert_eq!(t.desired.len(), 1, "{:?}", t.desired.keys());
    }
}
