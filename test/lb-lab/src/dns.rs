//! A small cluster DNS server, as CoreDNS's `kubernetes` plugin serves Services, and the
//! client side (`lb-lab resolve`).
//!
//! Records come from the same manifests the agent reads (Service and EndpointSlice
//! objects, re-read at each query so edits show at once), for names
//! `<service>.<namespace>.svc.cluster.local`:
//!
//! * a ClusterIP Service (any type with an IPv4 `clusterIP`): an A record, its ClusterIP;
//! * a headless Service (`clusterIP: None`): one A record per ready endpoint address of
//!   its EndpointSlices (`ready` absent counts as true, as in the API);
//! * an ExternalName Service: a CNAME to `spec.externalName`.
//!
//! Other names under `cluster.local` get NXDOMAIN, names outside it REFUSED (no
//! upstream here). UDP and TCP (two length bytes before each message, RFC 1035 4.2.2).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The cluster's DNS domain.
pub const DOMAIN: &str = "cluster.local";
/// Record types.
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;
/// Response codes.
pub const NOERROR: u8 = 0;
pub const FORMERR: u8 = 1;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const NOTIMP: u8 = 4;
pub const REFUSED: u8 = 5;
/// The TTL of every answer: CoreDNS's default for Services.
const TTL: u32 = 5;

/// What the server answers for a name: addresses or an alias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    A(Vec<Ipv4Addr>),
    Cname(String),
}

/// The records of a cluster, by fully qualified name (lower case, no trailing dot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records(pub BTreeMap<String, Record>);

impl Records {
    /// The records the Services and EndpointSlices among `docs` make.
    pub fn from_objects(docs: &[serde_yaml::Value]) -> anyhow::Result<Self> {
        let objects = flatten(docs);
        let mut records = BTreeMap::new();
        for svc in objects.iter().filter(|o| kind_of(o) == ("v1", "Service")) {
            let (ns, name) = ns_name(svc)?;
            let what = format!("Service {ns}/{name}");
            let spec = &svc["spec"];
            let fqdn = format!("{name}.{ns}.svc.{DOMAIN}");
            let record = if spec["type"].as_str() == Some("ExternalName") {
                let target = spec["externalName"].as_str().with_context(|| {
                    format!("{what}: field spec.externalName: missing for type ExternalName")
                })?;
                Record::Cname(target.trim_end_matches('.').to_lowercase())
            } else {
                match spec["clusterIP"].as_str() {
                    Some("None") => Record::A(ready_addresses(&objects, ns, name)?),
                    Some(ip) => match ip.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V4(v4)) => Record::A(vec![v4]),
                        Ok(std::net::IpAddr::V6(_)) => continue, // No AAAA here.
                        Err(_) => bail!("{what}: field spec.clusterIP: {ip:?} is not an address"),
                    },
                    None => continue, // Not allocated yet: no record, as CoreDNS.
                }
            };
            records.insert(fqdn, record);
        }
        Ok(Self(records))
    }

    /// The records of the manifests in `dir` (every `.yaml` / `.yml` file, multi-document).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::from_objects(&crate::manifest_objects(dir)?)
    }

    /// The answer to a question: response code and answer records.
    pub fn answer(&self, name: &str, qtype: u16) -> (u8, Vec<Answer>) {
        let name = name.trim_end_matches('.').to_lowercase();
        if name != DOMAIN && !name.ends_with(&format!(".{DOMAIN}")) {
            return (REFUSED, Vec::new());
        }
        let answers = match self.0.get(&name) {
            None => return (NXDOMAIN, Vec::new()),
            Some(Record::A(addrs)) if qtype == TYPE_A => addrs
                .iter()
                .map(|a| Answer {
                    name: name.clone(),
                    data: Data::A(*a),
                })
                .collect(),
            // An alias answers every type with itself (RFC 1034 3.6.2).
            Some(Record::Cname(target)) => vec![Answer {
                name: name.clone(),
                data: Data::Cname(target.clone()),
            }],
            Some(Record::A(_)) => Vec::new(), // The name exists, no data of that type.
        };
        (NOERROR, answers)
    }
}

/// Every object of `docs`, the items of `kind: List` documents included.
fn flatten(docs: &[serde_yaml::Value]) -> Vec<&serde_yaml::Value> {
    let mut out = Vec::new();
    for doc in docs {
        match (kind_of(doc), doc["items"].as_sequence()) {
            ((_, "List"), Some(items)) => out.extend(items.iter()),
            _ => out.push(doc),
        }
    }
    out
}

fn kind_of(o: &serde_yaml::Value) -> (&str, &str) {
    (
        o["apiVersion"].as_str().unwrap_or_default(),
        o["kind"].as_str().unwrap_or_default(),
    )
}

/// An object's namespace ("default" when absent) and name.
fn ns_name(o: &serde_yaml::Value) -> anyhow::Result<(&str, &str)> {
    let ns = o["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = o["metadata"]["name"].as_str().with_context(|| {
        format!(
            "{} in namespace {ns}: field metadata.name: missing",
            kind_of(o).1
        )
    })?;
    Ok((ns, name))
}

/// The ready IPv4 endpoint addresses of the EndpointSlices of Service `ns`/`name`.
fn ready_addresses(
    objects: &[&serde_yaml::Value],
    ns: &str,
    name: &str,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut addrs = Vec::new();
    for slice in objects
        .iter()
        .filter(|o| kind_of(o) == ("discovery.k8s.io/v1", "EndpointSlice"))
        .filter(|o| o["metadata"]["namespace"].as_str().unwrap_or("default") == ns)
        .filter(|o| o["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(name))
        .filter(|o| o["addressType"].as_str() == Some("IPv4"))
    {
        let (_, slice_name) = ns_name(slice)?;
        let endpoints = slice["endpoints"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        for (i, ep) in endpoints.iter().enumerate() {
            if ep["conditions"]["ready"].as_bool() == Some(false) {
                continue;
            }
            for a in ep["addresses"].as_sequence().into_iter().flatten() {
                let text = a.as_str().unwrap_or_default();
                let addr = text.parse().with_context(|| {
                    format!(
                        "EndpointSlice {ns}/{slice_name}: field endpoints[{i}].addresses: \
                         {text:?} is not an IPv4 address"
                    )
                })?;
                addrs.push(addr);
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// One answer record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub name: String,
    pub data: Data,
}

/// An answer's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum Data {
    A(Ipv4Addr),
    #[serde(rename = "CNAME")]
    Cname(String),
    /// A type this code does not decode: its number.
    Other(u16),
}

/// A DNS message as far as this server and client use one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub response: bool,
    /// The RD (query) or TC (response) flag is kept as it came.
    pub flags: u16,
    pub rcode: u8,
    /// The question: name and type.
    pub question: Option<(String, u16)>,
    pub answers: Vec<Answer>,
}

impl Message {
    /// Whether the response was truncated (TC: ask again over TCP).
    pub fn truncated(&self) -> bool {
        self.flags & 0x0200 != 0
    }
}

/// A query for `name` (type `qtype`), recursion desired.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.extend(id.to_be_bytes());
    out.extend(0x0100u16.to_be_bytes()); // RD
    out.extend([0, 1, 0, 0, 0, 0, 0, 0]); // 1 question
    encode_name(name, &mut out)?;
    out.extend(qtype.to_be_bytes());
    out.extend(CLASS_IN.to_be_bytes());
    Ok(out)
}

/// The response to `query` with `rcode` and `answers` (authoritative, RD copied).
pub fn encode_response(query: &Message, rcode: u8, answers: &[Answer]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.extend(query.id.to_be_bytes());
    let flags = 0x8000 | 0x0400 | (query.flags & 0x0100) | u16::from(rcode & 0x0f);
    out.extend(flags.to_be_bytes());
    let qd = u16::from(query.question.is_some());
    out.extend(qd.to_be_bytes());
    out.extend((answers.len() as u16).to_be_bytes());
    out.extend([0, 0, 0, 0]);
    if let Some((name, qtype)) = &query.question {
        encode_name(name, &mut out)?;
        out.extend(qtype.to_be_bytes());
        out.extend(CLASS_IN.to_be_bytes());
    }
    for a in answers {
        encode_name(&a.name, &mut out)?;
        let (rtype, rdata) = match &a.data {
            Data::A(ip) => (TYPE_A, ip.octets().to_vec()),
            Data::Cname(target) => {
                let mut rdata = Vec::new();
                encode_name(target, &mut rdata)?;
                (TYPE_CNAME, rdata)
            }
            Data::Other(t) => bail!("cannot encode an answer of type {t}"),
        };
        out.extend(rtype.to_be_bytes());
        out.extend(CLASS_IN.to_be_bytes());
        out.extend(TTL.to_be_bytes());
        out.extend((rdata.len() as u16).to_be_bytes());
        out.extend(rdata);
    }
    Ok(out)
}

/// `name` as labels (no compression), checking RFC 1035's limits.
fn encode_name(name: &str, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let name = name.trim_end_matches('.');
    if name.len() > 253 {
        bail!("DNS name {name:?}: longer than 253 characters");
    }
    for label in name
        .split('.')
        .filter(|l| !name.is_empty() || !l.is_empty())
    {
        if label.is_empty() || label.len() > 63 {
            bail!("DNS name {name:?}: label {label:?} is empty or longer than 63 bytes");
        }
        out.push(label.len() as u8);
        out.extend(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// A big-endian u16 at `at`, or an error naming the field.
fn be16(buf: &[u8], at: usize, field: &str) -> anyhow::Result<u16> {
    match buf.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => bail!("DNS message of {} bytes: {field} cut short", buf.len()),
    }
}

/// The name at `at` (compression pointers followed, at most 16) and the offset after it
/// in the message.
fn decode_name(buf: &[u8], mut at: usize) -> anyhow::Result<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *buf.get(at).context("DNS name: cut short")? as usize;
        match len {
            0 => {
                let name = labels.join(".");
                if name.len() > 253 {
                    bail!("DNS name: longer than 253 characters");
                }
                return Ok((name, end.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = usize::from(be16(buf, at, "name pointer")? & 0x3fff);
                end.get_or_insert(at + 2);
                if labels.len() > 127 || ptr >= at {
                    bail!("DNS name: a compression pointer that does not point back");
                }
                at = ptr;
            }
            l if l > 63 => bail!("DNS name: label length {l} (over 63)"),
            l => {
                let label = buf
                    .get(at + 1..at + 1 + l)
                    .context("DNS name: label cut short")?;
                labels.push(String::from_utf8_lossy(label).to_lowercase());
                at += 1 + l;
            }
        }
    }
    bail!("DNS name: more than 128 labels")
}

/// Decodes a query or a response (its first question and its answer section).
pub fn decode(buf: &[u8]) -> anyhow::Result<Message> {
    let id = be16(buf, 0, "header")?;
    let flags = be16(buf, 2, "header")?;
    let qd = be16(buf, 4, "header")?;
    let an = be16(buf, 6, "header")?;
    be16(buf, 10, "header")?;
    if qd > 1 {
        bail!("DNS message: {qd} questions (one is supported)");
    }
    let mut at = 12;
    let mut question = None;
    if qd == 1 {
        let (name, next) = decode_name(buf, at)?;
        let qtype = be16(buf, next, "question type")?;
        be16(buf, next + 2, "question class")?;
        question = Some((name, qtype));
        at = next + 4;
    }
    let mut answers = Vec::new();
    for _ in 0..an {
        let (name, next) = decode_name(buf, at)?;
        let rtype = be16(buf, next, "answer type")?;
        let len = usize::from(be16(buf, next + 8, "answer length")?);
        let start = next + 10;
        let rdata = buf
            .get(start..start + len)
            .context("DNS answer: data cut short")?;
        let data = match (rtype, len) {
            (TYPE_A, 4) => Data::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_A, _) => bail!("DNS answer: an A record of {len} bytes"),
            (TYPE_CNAME, _) => Data::Cname(decode_name(buf, start)?.0),
            (other, _) => Data::Other(other),
        };
        answers.push(Answer { name, data });
        at = start + len;
    }
    Ok(Message {
        id,
        response: flags & 0x8000 != 0,
        flags: flags & 0x0300,
        rcode: (flags & 0x0f) as u8,
        question,
        answers,
    })
}

/// The response bytes to the query bytes `buf` with the records of `dir` (re-read now;
/// SERVFAIL when they cannot be read, FORMERR for a message that is not a query).
pub fn respond(buf: &[u8], dir: &Path) -> Option<Vec<u8>> {
    let query = match decode(buf) {
        Ok(q) if !q.response => q,
        Ok(_) => return None, // A response: never answered.
        Err(_) => {
            let id = be16(buf, 0, "header").ok()?;
            let q = Message {
                id,
                response: false,
                flags: 0,
                rcode: 0,
                question: None,
                answers: Vec::new(),
            };
            return encode_response(&q, FORMERR, &[]).ok();
        }
    };
    let (rcode, answers) = match (&query.question, Records::from_dir(dir)) {
        (None, _) => (FORMERR, Vec::new()),
        (Some(_), Err(e)) => {
            eprintln!("lb-lab dns: {e:#}");
            (SERVFAIL, Vec::new())
        }
        (Some((name, qtype)), Ok(records)) => records.answer(name, *qtype),
    };
    encode_response(&query, rcode, &answers).ok()
}

/// `lb-lab dns`: serves the records of the manifests in `dir` on UDP and TCP `port`
/// (dual-stack sockets); prints "ready" once both are bound; runs until killed.
pub fn serve(dir: &Path, port: u16) -> anyhow::Result<()> {
    let udp = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding UDP port {port}"))?;
    let tcp = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding TCP port {port}"))?;
    Records::from_dir(dir)?;
    println!("ready");
    std::io::stdout().flush()?;
    let tcp_dir = dir.to_path_buf();
    std::thread::spawn(move || {
        for conn in tcp.incoming().flatten() {
            let dir = tcp_dir.clone();
            std::thread::spawn(move || serve_tcp(conn, &dir));
        }
    });
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = udp.recv_from(&mut buf)?;
        if let Some(reply) = respond(&buf[..n], dir) {
            let _ = udp.send_to(&reply, peer);
        }
    }
}

/// The queries of one TCP connection, each after its two length bytes, until it ends
/// (or is idle for 5 s).
fn serve_tcp(mut conn: TcpStream, dir: &Path) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    for _ in 0..1000 {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut buf).is_err() {
            return;
        }
        let Some(reply) = respond(&buf, dir) else {
            return;
        };
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend(reply);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// What `lb-lab resolve` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Resolved {
    pub rcode: String,
    pub answers: Vec<Answer>,
    /// The address the answer came from (UDP: as recvfrom() says; TCP: getpeername()).
    pub from: SocketAddr,
    pub tcp: bool,
}

/// A response code's name.
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        NOERROR => "NOERROR".into(),
        FORMERR => "FORMERR".into(),
        SERVFAIL => "SERVFAIL".into(),
        NXDOMAIN => "NXDOMAIN".into(),
        NOTIMP => "NOTIMP".into(),
        REFUSED => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// `lb-lab resolve`: asks `server` for the A records of `name`, over UDP as a stub
/// resolver does (an unconnected socket; a reply from any other address than `server`
/// or with another id is ignored; TCP again when it is truncated), or over TCP.
pub fn resolve(server: SocketAddr, name: &str, tcp: bool) -> anyhow::Result<Resolved> {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let query = encode_query(id, name, TYPE_A)?;
    let (reply, from) = if tcp {
        ask_tcp(server, &query)?
    } else {
        let (reply, from) = ask_udp(server, &query, id)?;
        if decode(&reply)?.truncated() {
            ask_tcp(server, &query)?
        } else {
            (reply, from)
        }
    };
    let msg = decode(&reply)?;
    if msg.id != id || !msg.response {
        bail!(
            "{from} answered with id {} (asked {id}) or not a response",
            msg.id
        );
    }
    Ok(Resolved {
        rcode: rcode_name(msg.rcode),
        answers: msg.answers,
        from,
        tcp,
    })
}

/// One query over UDP: up to 3 tries of 1 s; the reply and where it came from.
fn ask_udp(server: SocketAddr, query: &[u8], id: u16) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        socket
            .send_to(query, server)
            .with_context(|| format!("sending a query to {server}"))?;
        // Datagrams from elsewhere, or with another id, are not the answer.
        for _ in 0..8 {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == server && be16(&buf[..n], 0, "id").ok() == Some(id) => {
                    return Ok((buf[..n].to_vec(), from));
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    bail!("no answer from {server} over UDP (3 tries of 1 s)")
}

/// One query over TCP; the reply and the peer's address.
fn ask_tcp(server: SocketAddr, query: &[u8]) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(2))
        .with_context(|| format!("connecting to {server} over TCP"))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend(query);
    conn.write_all(&out)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)
        .with_context(|| format!("reading the answer from {server}"))?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut buf)?;
    Ok((buf, conn.peer_addr()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {type: NodePort, clusterIP: 10.96.0.20}
---
apiVersion: v1
kind: Service
metadata: {name: web-pods, namespace: demo}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: docs, namespace: demo}
spec: {type: ExternalName, externalName: docs.example.org.}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-pods-1
  namespace: demo
  labels: {kubernetes.io/service-name: web-pods}
addressType: IPv4
endpoints:
- addresses: [10.244.2.2]
- addresses: [10.244.1.2]
  conditions: {ready: true}
- addresses: [10.244.3.2]
  conditions: {ready: false, serving: true, terminating: true}
";

    fn records(text: &str) -> anyhow::Result<Records> {
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        Records::from_objects(&docs)
    }

    #[test]
    fn services_make_a_cluster_ip_the_ready_pods_and_an_alias() {
        let r = records(OBJECTS).unwrap();
        let a = |ip: [u8; 4]| Data::A(ip.into());
        let data = |name: &str| {
            let (rcode, answers) = r.answer(name, TYPE_A);
            (
                rcode,
                answers.into_iter().map(|a| a.data).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            data("web.demo.svc.cluster.local."),
            (NOERROR, vec![a([10, 96, 0, 20])])
        );
        // Headless: the ready endpoints (absent `ready` is ready), sorted.
        assert_eq!(
            data("WEB-PODS.demo.svc.cluster.local"),
            (NOERROR, vec![a([10, 244, 1, 2]), a([10, 244, 2, 2])])
        );
        assert_eq!(
            data("docs.demo.svc.cluster.local"),
            (NOERROR, vec![Data::Cname("docs.example.org".into())])
        );
        assert_eq!(data("nope.demo.svc.cluster.local"), (NXDOMAIN, vec![]));
        assert_eq!(data("example.org"), (REFUSED, vec![]));
        // The name exists, the type has no data.
        assert_eq!(
            r.answer("web.demo.svc.cluster.local", 28),
            (NOERROR, vec![])
        );
    }

    #[test]
    fn bad_objects_are_named_with_their_field() {
        let e = records("apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: n}\nspec: {type: ExternalName}\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Service n/x: field spec.externalName: missing for type ExternalName"
        );
        let e = records("apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: n}\nspec: {clusterIP: 10.96.0.300}\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("Service n/x: field spec.clusterIP"),
            "{e}"
        );
    }

    #[test]
    fn a_query_and_its_response_round_trip_through_the_wire_format() {
        let q = encode_query(0x1234, "web.demo.svc.cluster.local", TYPE_A).unwrap();
        // Header: id, RD, one question; then 3web4demo3svc7cluster5local0, A, IN.
        assert_eq!(&q[..12], &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..16], b"\x03web");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
        let query = decode(&q).unwrap();
        assert!(!query.response);
        assert_eq!(
            query.question,
            Some(("web.demo.svc.cluster.local".into(), TYPE_A))
        );
        let answers = vec![
            Answer {
                name: "docs.demo.svc.cluster.local".into(),
                data: Data::Cname("docs.example.org".into()),
            },
            Answer {
                name: "web.demo.svc.cluster.local".into(),
                data: Data::A(Ipv4Addr::new(10, 96, 0, 20)),
            },
        ];
        let r = encode_response(&query, NOERROR, &answers).unwrap();
        // QR, AA, RD; NOERROR; one question, two answers.
        assert_eq!(&r[..8], &[0x12, 0x34, 0x85, 0x00, 0, 1, 0, 2]);
        let response = decode(&r).unwrap();
        assert!(response.response && !response.truncated());
        assert_eq!((response.id, response.rcode), (0x1234, NOERROR));
        assert_eq!(response.answers, answers);
        let nx = decode(&encode_response(&query, NXDOMAIN, &[]).unwrap()).unwrap();
        assert_eq!((nx.rcode, nx.answers.len()), (NXDOMAIN, 0));
    }

    #[test]
    fn compressed_names_are_followed_and_loops_refused() {
        // A response whose answer name points at the question's (0xc00c), as servers send.
        let mut r = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        r.extend(b"\x01a\x07cluster\x05local\x00\x00\x01\x00\x01");
        r.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 1]);
        let m = decode(&r).unwrap();
        assert_eq!(m.answers[0].name, "a.cluster.local");
        assert_eq!(m.answers[0].data, Data::A(Ipv4Addr::new(10, 96, 0, 1)));
        // A pointer to itself.
        let mut bad = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        bad.extend([0xc0, 12, 0, 1, 0, 1]);
        assert!(decode(&bad).unwrap_err().to_string().contains("point back"));
        // Cut short, a label over 63 bytes, a name over 253.
        assert!(decode(&[0, 1, 0]).is_err());
        assert!(decode(&[0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64]).is_err());
        assert!(encode_query(1, &"a.".repeat(130), TYPE_A).is_err());
        assert!(encode_query(1, &"a".repeat(64), TYPE_A).is_err());
    }

    #[test]
    fn garbage_gets_formerr_and_responses_get_nothing() {
        let dir = Path::new("/nonexistent");
        let r = respond(&[0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 70], dir).unwrap();
        let m = decode(&r).unwrap();
        assert_eq!((m.id, m.rcode, m.response), (0xabcd, FORMERR, true));
        let q = decode(&encode_query(7, "web.demo.svc.cluster.local", TYPE_A).unwrap()).unwrap();
        let response = encode_response(&q, NOERROR, &[]).unwrap();
        assert_eq!(respond(&response, dir), None);
        // Manifests that cannot be read: SERVFAIL, not a crash.
        let r = respond(&encode_query(7, "x.cluster.local", TYPE_A).unwrap(), dir).unwrap();
        assert_eq!(decode(&r).unwrap().rcode, SERVFAIL);
    }
}
