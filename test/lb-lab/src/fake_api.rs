//! A fake Kubernetes API server that speaks real HTTP/1.1, for the real kube-rs client,
//! watcher and backoff: list with resourceVersion, chunked watch streams, bookmarks,
//! 410 Gone for expired resource versions, and dropped connections. Services,
//! EndpointSlices and Nodes, with label selectors (`k`, `!k`, `k=v`, `k!=v`) and the
//! `metadata.name` / `metadata.namespace` field selectors.
//!
//! Faults are switched on with [`FakeApi::fail`] and off with [`FakeApi::heal`]; see
//! [`Fault`]. Dropping the server ends its thread at once, stalled connections included.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlice),
            "/api/v1/nodes" => Some(Self::Node),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("ServiceList", "v1"),
            Self::EndpointSlice => ("EndpointSliceList", "discovery.k8s.io/v1"),
            Self::Node => ("NodeList", "v1"),
        }
    }

    pub fn of(obj: &Value) -> Self {
        match obj["kind"].as_str() {
            Some("Service") => Self::Service,
            Some("EndpointSlice") => Self::EndpointSlice,
            Some("Node") => Self::Node,
            other => panic!("fake API: unsupported kind {other:?}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

/// A way for the server to misbehave, until [`FakeApi::heal`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// LISTs are accepted and read, and never answered.
    StallLists,
    /// Every LIST and WATCH is answered 500 Internal Server Error.
    Status500,
    /// Every WATCH is answered 200 and ended at once, with no event.
    CloseWatches,
    /// A watch's next event is cut in the middle of its JSON line (its chunk
    /// incomplete), and the connection closed.
    Truncate,
    /// Every WATCH gets a 410 Gone ERROR event and ends (its resourceVersion too old).
    Gone,
}

#[derive(Clone, Copy, Debug)]
enum Control {
    /// Close every watch connection abruptly (no final chunk).
    Drop,
    /// Send every watch a 410 Gone ERROR event and end it.
    Expire,
    /// Send a BOOKMARK with the current resourceVersion to every watch that allows it.
    Bookmark,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Event>,
    requests: Vec<String>,
    /// Bookmarks written to watch streams.
    bookmarks_sent: usize,
    faults: std::collections::BTreeSet<Fault>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    control: broadcast::Sender<Control>,
    stop: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

fn key(obj: &Value) -> (Kind, String, String) {
    (
        Kind::of(obj),
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        obj["metadata"]["name"]
            .as_str()
            .expect("objects have a name")
            .to_string(),
    )
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 (a port of its own) in a thread with its own
    /// runtime, so that it works from synchronous and asynchronous tests alike.
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            ..State::default()
        }));
        let (events, _) = broadcast::channel(1024);
        let (control, _) = broadcast::channel(16);
        let (st, ev, ctl) = (state.clone(), events.clone(), control.clone());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(serve_conn(conn, st.clone(), ev.clone(), ctl.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().expect("the fake API server started");
        Self {
            addr,
            state,
            events,
            control,
            stop: Some((stop_tx, thread)),
        }
    }

    /// A kubeconfig file for this server (plain HTTP).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
                 users:\n- name: tester\n  user: {{token: fake-token}}\ncontexts:\n- name: fake\n  \
                 context: {{cluster: fake, user: tester}}\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// Creates or replaces an object (YAML or JSON text); returns its resourceVersion.
    pub fn apply(&self, text: &str) -> u64 {
        let mut obj: Value = serde_yaml::from_str(text).expect("test objects are valid YAML");
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&obj);
        let type_ = if st.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(k.clone(), obj.clone());
        let ev = Event {
            rv,
            kind: k.0,
            type_,
            object: obj,
        };
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
        rv
    }

    /// Deletes an object; returns the resourceVersion of the deletion.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut st = self.state.lock().unwrap();
        let mut obj = st
            .objects
            .remove(&(kind, namespace.into(), name.into()))
            .expect("deleting an object that exists");
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Event {
            rv,
            kind,
            type_: "DELETED",
            object: obj,
        };
        st.history.push(ev.clone());
        let _ = self.events.send(ev);
        rv
    }

    /// Forgets history (watches from an older resourceVersion get 410 Gone) and expires
    /// every open watch, as an apiserver does after etcd compaction.
    pub fn compact(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
        drop(st);
        let _ = self.control.send(Control::Expire);
    }

    /// Cuts every open watch connection in the middle of its stream.
    pub fn drop_watches(&self) {
        let _ = self.control.send(Control::Drop);
    }

    /// Sends a bookmark to every open watch; returns its resourceVersion.
    pub fn bookmark(&self) -> u64 {
        let rv = self.state.lock().unwrap().rv;
        let _ = self.control.send(Control::Bookmark);
        rv
    }

    /// Bookmarks written to watch streams so far (one per open watch and bookmark).
    pub fn bookmarks_sent(&self) -> usize {
        self.state.lock().unwrap().bookmarks_sent
    }

    /// Requests served so far, as "LIST services rv=" / "WATCH services rv=N".
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Misbehaves as `fault` says from now on (requests already being served are not
    /// touched, except that a truncated event can be any watch's next one).
    pub fn fail(&self, fault: Fault) {
        self.state.lock().unwrap().faults.insert(fault);
    }

    /// Every fault off: requests are served normally again (LISTs stalled meanwhile stay
    /// stalled until their client gives up).
    pub fn heal(&self) {
        self.state.lock().unwrap().faults.clear();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.stop.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches(obj: &Value, labels: &str, fields: &str) -> bool {
    let obj_labels = &obj["metadata"]["labels"];
    let label = |k: &str| obj_labels.get(k).and_then(Value::as_str);
    let labels_ok = labels.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k) == Some(v)
        } else {
            label(term).is_some()
        }
    });
    let fields_ok = fields.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        match k {
            "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        }
    });
    labels_ok && fields_ok
}

async fn respond(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await
}

async fn chunk(conn: &mut TcpStream, value: &Value) -> std::io::Result<()> {
    let line = format!("{value}\n");
    conn.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
        .await
}

/// One event as a chunk; with [`Fault::Truncate`], half of it, then the connection is
/// closed (an error: the peer must not go on).
async fn event_chunk(conn: &mut TcpStream, state: &Mutex<State>, e: &Event) -> std::io::Result<()> {
    let value = json!({"type": e.type_, "object": e.object});
    if !state.lock().unwrap().faults.contains(&Fault::Truncate) {
        return chunk(conn, &value).await;
    }
    let line = format!("{value}\n");
    let half = &line.as_bytes()[..line.len() / 2];
    conn.write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    conn.write_all(half).await?;
    let _ = conn.shutdown().await;
    Err(std::io::Error::other("the event was truncated on purpose"))
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
}

/// One request: its path and decoded query parameters (GET only: no body).
struct Request {
    path: String,
    params: BTreeMap<String, String>,
}

impl Request {
    fn param(&self, key: &str) -> String {
        self.params.get(key).cloned().unwrap_or_default()
    }

    /// The last path segment: "services", "endpointslices", "nodes".
    fn resource(&self) -> String {
        self.path.rsplit('/').next().unwrap_or_default().to_string()
    }
}

/// Reads the request line and headers; `None` when the client closed.
async fn read_request(conn: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut request_line = String::new();
    if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return None;
    }
    loop {
        let mut header = String::new();
        if conn.read_line(&mut header).await.unwrap_or(0) == 0 {
            return None;
        }
        if header == "\r\n" || header == "\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect();
    Some(Request {
        path: path.to_string(),
        params,
    })
}

async fn serve_conn(
    conn: TcpStream,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Event>,
    control: broadcast::Sender<Control>,
) {
    let mut conn = BufReader::new(conn);
    while let Some(req) = read_request(&mut conn).await {
        let Some(kind) = Kind::from_path(&req.path) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("the fake API does not serve {}", req.path), "reason": "NotFound", "code": 404});
            if respond(conn.get_mut(), "404 Not Found", &body.to_string())
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        let is_watch = matches!(req.param("watch").as_str(), "true" | "1");
        let faults = state.lock().unwrap().faults.clone();
        if faults.contains(&Fault::Status500) {
            record(&state, if is_watch { "WATCH" } else { "LIST" }, &req);
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "the fake API fails on purpose", "reason": "InternalError", "code": 500});
            if respond(
                conn.get_mut(),
                "500 Internal Server Error",
                &body.to_string(),
            )
            .await
            .is_err()
            {
                return;
            }
            continue;
        }
        if !is_watch && faults.contains(&Fault::StallLists) {
            record(&state, "LIST", &req);
            // Never answered: held until the client gives up (or the server stops).
            let mut sink = [0u8; 512];
            while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            return;
        }
        if !is_watch {
            let body = list(&state, &req, kind);
            if respond(conn.get_mut(), "200 OK", &body.to_string())
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        // A watch: one chunked stream, then the connection is closed.
        let rx = (events.subscribe(), control.subscribe());
        watch(conn.get_mut(), &state, &req, kind, rx).await;
        return;
    }
}

/// Logs a request as "LIST services rv=" / "WATCH services rv=N".
fn record(state: &Mutex<State>, verb: &str, req: &Request) {
    state.lock().unwrap().requests.push(format!(
        "{verb} {} rv={}",
        req.resource(),
        req.param("resourceVersion")
    ));
}

/// The objects of `kind` that match the request's selectors, as a list.
fn list(state: &Mutex<State>, req: &Request, kind: Kind) -> Value {
    let (labels, fields) = (req.param("labelSelector"), req.param("fieldSelector"));
    record(state, "LIST", req);
    let st = state.lock().unwrap();
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && matches(o, &labels, &fields))
        .map(|(_, o)| o)
        .collect();
    let (list_kind, api_version) = kind.list_kind();
    json!({"kind": list_kind, "apiVersion": api_version,
        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
}

/// A watch stream from the request's resourceVersion: 410 if it is compacted away, else
/// the backlog, then live events, bookmarks, drops and expiries until its timeout.
async fn watch(
    conn: &mut TcpStream,
    state: &Mutex<State>,
    req: &Request,
    kind: Kind,
    (rx_events, rx_control): (broadcast::Receiver<Event>, broadcast::Receiver<Control>),
) {
    let (labels, fields) = (req.param("labelSelector"), req.param("fieldSelector"));
    let from: u64 = req.param("resourceVersion").parse().unwrap_or(0);
    let bookmarks = req.param("allowWatchBookmarks") == "true";
    let timeout = Duration::from_secs(req.param("timeoutSeconds").parse().unwrap_or(300));
    record(state, "WATCH", req);
    let (backlog, expired, faults) = {
        let st = state.lock().unwrap();
        let expired = from < st.compacted || st.faults.contains(&Fault::Gone);
        let backlog: Vec<Event> = st
            .history
            .iter()
            .filter(|e| e.kind == kind && e.rv > from)
            .cloned()
            .collect();
        (backlog, expired, st.faults.clone())
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if expired {
        let _ = chunk(conn, &gone()).await;
        let _ = conn.write_all(b"0\r\n\r\n").await;
        return;
    }
    if faults.contains(&Fault::CloseWatches) {
        let _ = conn.write_all(b"0\r\n\r\n").await;
        return;
    }
    let mut last = from;
    for e in backlog {
        if matches(&e.object, &labels, &fields) && event_chunk(conn, state, &e).await.is_err() {
            return;
        }
        last = e.rv;
    }
    let live = Live {
        kind,
        labels: &labels,
        fields: &fields,
        bookmarks,
        last,
    };
    live.stream(conn, state, timeout, rx_events, rx_control)
        .await;
}

/// What a watch streams once its backlog is sent.
struct Live<'a> {
    kind: Kind,
    labels: &'a str,
    fields: &'a str,
    bookmarks: bool,
    /// The resourceVersion sent last.
    last: u64,
}

impl Live<'_> {
    /// Live events, bookmarks, drops and expiries until `timeout`.
    async fn stream(
        mut self,
        conn: &mut TcpStream,
        state: &Mutex<State>,
        timeout: Duration,
        mut rx_events: broadcast::Receiver<Event>,
        mut rx_control: broadcast::Receiver<Control>,
    ) {
        let (kind, labels, fields, bookmarks) =
            (self.kind, self.labels, self.fields, self.bookmarks);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ev = rx_events.recv() => {
                    let Ok(e) = ev else { return };
                    if e.kind != kind || e.rv <= self.last {
                        continue;
                    }
                    self.last = e.rv;
                    if matches(&e.object, labels, fields) && event_chunk(conn, state, &e).await.is_err() {
                        return;
                    }
                }
                c = rx_control.recv() => match c {
                    Ok(Control::Drop) | Err(_) => {
                        // Abrupt: no final chunk, the peer sees a broken stream.
                        let _ = conn.shutdown().await;
                        return;
                    }
                    Ok(Control::Expire) => {
                        let _ = chunk(conn, &gone()).await;
                        let _ = conn.write_all(b"0\r\n\r\n").await;
                        return;
                    }
                    Ok(Control::Bookmark) => {
                        if !bookmarks {
                            continue;
                        }
                        let rv = state.lock().unwrap().rv;
                        if chunk(conn, &bookmark(kind, rv)).await.is_err() {
                            return;
                        }
                        state.lock().unwrap().bookmarks_sent += 1;
                        self.last = self.last.max(rv);
                    }
                },
                _ = &mut deadline => {
                    let _ = conn.write_all(b"0\r\n\r\n").await;
                    return;
                }
            }
        }
    }
}

fn bookmark(kind: Kind, rv: u64) -> Value {
    let (k, api_version) = match kind {
        Kind::Service => ("Service", "v1"),
        Kind::EndpointSlice => ("EndpointSlice", "discovery.k8s.io/v1"),
        Kind::Node => ("Node", "v1"),
    };
    json!({"type": "BOOKMARK", "object": {"kind": k, "apiVersion": api_version,
        "metadata": {"resourceVersion": rv.to_string()}}})
}
