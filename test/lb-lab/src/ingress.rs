//! A small HTTP ingress proxy, as an ingress controller's pod does it: the routes come
//! from `networking.k8s.io/v1` Ingress objects (each rule's `host` to the Service of its
//! first path), and each request goes to that Service's ClusterIP and port, which the
//! load balancer translates at connect() (the proxy runs in a pod of the node's cgroup).
//!
//! One request per connection (`Connection: close`). The lab's pod servers answer one
//! line, not HTTP: an upstream answer that is not an HTTP response is sent on as the
//! body of a 200. Unknown hosts get 404, an upstream that cannot be reached 502.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Host (lower case, no port) -> the Service's ClusterIP and port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(pub BTreeMap<String, SocketAddrV4>);

impl Routes {
    /// The routes of the Ingress objects among `docs`, through the Services among them.
    pub fn from_objects(docs: &[serde_yaml::Value]) -> anyhow::Result<Self> {
        let mut routes = BTreeMap::new();
        let of_kind = |api: &'static str, kind: &'static str| {
            docs.iter().filter(move |d| {
                d["apiVersion"].as_str() == Some(api) && d["kind"].as_str() == Some(kind)
            })
        };
        for ing in of_kind("networking.k8s.io/v1", "Ingress") {
            let ns = ing["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = ing["metadata"]["name"].as_str().unwrap_or("<no name>");
            let what = format!("Ingress {ns}/{name}");
            let rules = ing["spec"]["rules"]
                .as_sequence()
                .cloned()
                .unwrap_or_default();
            for (i, rule) in rules.iter().enumerate() {
                let field = format!("spec.rules[{i}]");
                let host = rule["host"]
                    .as_str()
                    .with_context(|| format!("{what}: field {field}.host: missing"))?;
                let backend = &rule["http"]["paths"][0]["backend"]["service"];
                let svc = backend["name"].as_str().with_context(|| {
                    format!("{what}: field {field}.http.paths[0].backend.service.name: missing")
                })?;
                let port = backend["port"]["number"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .with_context(|| {
                        format!(
                            "{what}: field {field}.http.paths[0].backend.service.port.number: \
                             missing or not a port (port names are not supported)"
                        )
                    })?;
                let ip = of_kind("v1", "Service")
                    .find(|s| {
                        s["metadata"]["name"].as_str() == Some(svc)
                            && s["metadata"]["namespace"].as_str().unwrap_or("default") == ns
                    })
                    .and_then(|s| s["spec"]["clusterIP"].as_str()?.parse().ok())
                    .with_context(|| {
                        format!("{what}: Service {ns}/{svc} of {field} has no IPv4 ClusterIP")
                    })?;
                routes.insert(host.to_lowercase(), SocketAddrV4::new(ip, port));
            }
        }
        Ok(Self(routes))
    }

    /// The routes of the manifests in `dir`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::from_objects(&crate::manifest_objects(dir)?)
    }

    /// Where a request with this head goes: the upstream, or the status to answer.
    pub fn route(&self, head: &str) -> Result<SocketAddrV4, u16> {
        let host = host_of(head).ok_or(400u16)?;
        self.0.get(&host).copied().ok_or(404)
    }
}

/// The request's Host header, lower case, without its port (HTTP/1.1 requires one).
pub fn host_of(head: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("host") {
            return None;
        }
        let value = value.trim();
        let host = match value.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => value,
        };
        (!host.is_empty()).then(|| host.to_lowercase())
    })
}

/// `lb-lab ingress`: serves HTTP on `port` with the routes of the Ingress objects in
/// `dir` (read at start); prints "ready" once bound and runs until killed.
pub fn serve(dir: &Path, port: u16) -> anyhow::Result<()> {
    let routes = Routes::from_dir(dir)?;
    if routes.0.is_empty() {
        bail!("no Ingress rules in {}", dir.display());
    }
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding TCP port {port}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in listener.incoming().flatten() {
        let routes = routes.clone();
        std::thread::spawn(move || {
            let _ = handle(conn, &routes);
        });
    }
    Ok(())
}

/// One request: read its head, pass it to the upstream of its host, send back the answer.
fn handle(mut conn: TcpStream, routes: &Routes) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let head = read_head(&mut conn)?;
    let (status, body) = match routes.route(&head) {
        Err(status) => (
            status,
            format!("no route for host {}\n", host_of(&head).unwrap_or_default()),
        ),
        Ok(upstream) => match forward(&head, upstream, conn.peer_addr()?) {
            Ok(answer) if answer.starts_with(b"HTTP/") => return conn.write_all(&answer),
            Ok(answer) => (200, String::from_utf8_lossy(&answer).into_owned()),
            Err(e) => (502, format!("upstream {upstream}: {e}\n")),
        },
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Bad Gateway",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The request head, up to the empty line (at most 16 KiB).
fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 || head.len() > 16 << 10 {
            break;
        }
        head.extend(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The head sent to `upstream` in one write (with `X-Forwarded-For`, and
/// `Connection: close`); its whole answer.
fn forward(head: &str, upstream: SocketAddrV4, client: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect_timeout(&upstream.into(), Duration::from_secs(2))?;
    up.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = String::new();
    for line in head.trim_end().lines() {
        let name = line.split(':').next().unwrap_or_default().trim();
        if !name.eq_ignore_ascii_case("connection") {
            request.push_str(line.trim_end());
            request.push_str("\r\n");
        }
    }
    request.push_str(&format!(
        "X-Forwarded-For: {}\r\nConnection: close\r\n\r\n",
        client.ip().to_canonical()
    ));
    up.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;

    const OBJECTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.20}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec: {clusterIP: 10.96.0.21}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: demo, namespace: demo}
spec:
  rules:
  - host: web.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
  - host: API.example.com
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: api, port: {number: 8080}}}}
";

    fn docs(text: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn requests_go_by_host_header_to_the_service_cluster_ip() {
        let routes = Routes::from_objects(&docs(OBJECTS)).unwrap();
        let head = |host: &str| format!("GET / HTTP/1.1\r\nUser-Agent: t\r\n{host}\r\n\r\n");
        assert_eq!(
            routes.route(&head("Host: web.example.com")),
            Ok("10.96.0.20:80".parse().unwrap())
        );
        // Case and the port do not matter; the header name's case neither.
        assert_eq!(
            routes.route(&head("host: Api.Example.com:8443")),
            Ok("10.96.0.21:8080".parse().unwrap())
        );
        assert_eq!(routes.route(&head("Host: other.example.com")), Err(404));
        assert_eq!(routes.route(&head("X-Host: web.example.com")), Err(400));
        // The request line is not a header.
        assert_eq!(
            routes.route("GET http://host:80/ HTTP/1.1\r\n\r\n"),
            Err(400)
        );
    }

    #[test]
    fn an_ingress_to_an_unknown_service_or_a_named_port_is_an_error_naming_the_field() {
        let text = OBJECTS.replace("name: api, port", "name: nope, port");
        let e = Routes::from_objects(&docs(&text)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Ingress demo/demo: Service demo/nope of spec.rules[1] has no IPv4 ClusterIP"
        );
        let text = OBJECTS.replace("{number: 80}", "{name: http}");
        let e = Routes::from_objects(&docs(&text)).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "Ingress demo/demo: field spec.rules[0].http.paths[0].backend.service.port.number"
            ),
            "{e}"
        );
    }
}
