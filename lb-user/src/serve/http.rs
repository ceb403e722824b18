//! The little HTTP the agent serves (metrics, health checks): read one request's path,
//! write one response, close.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// A response: status line, content type, body.
pub type Response = (&'static str, &'static str, String);

/// Serves HTTP on `addr` until the task is aborted: `bound` hears whether it could
/// listen (a failure is the caller's to log, never fatal), then every request's path
/// goes to `answer` (`None`: close without a response).
pub fn serve(
    addr: SocketAddr,
    bound: impl FnOnce(Result<(), &std::io::Error>) + Send + 'static,
    answer: impl Fn(&str) -> Option<Response> + Send + Sync + 'static,
) -> JoinHandle<()> {
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => return bound(Err(&e)),
        };
        bound(Ok(()));
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(path) = request_path(&mut conn).await else {
                    return;
                };
                if let Some((status, content_type, body)) = answer(&path) {
                    respond(&mut conn, status, content_type, &body).await;
                }
            });
        }
    })
}

/// The path of the request on `conn` (headers read up to 4 KiB, 5 s at most); `None`
/// when the client sent nothing usable.
pub async fn request_path(conn: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    request.split_whitespace().nth(1).map(str::to_string)
}

/// One response, then the connection is closed.
pub async fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes()).await;
}
