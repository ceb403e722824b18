//! The HTTP the agent serves (metrics, `/healthz` and `/livez`, healthCheckNodePorts):
//! hyper's HTTP/1 server, one request per connection, with limits so that slow or
//! hostile clients cannot take a listener from the others:
//!
//! * at most [`Limits::max_connections`] connections; at the cap, a new connection
//!   evicts the oldest one still sending its request head, or is closed at once when
//!   every connection has sent its request;
//! * a request head must arrive within [`Limits::header_timeout`], and a connection is
//!   closed after [`Limits::connection_timeout`] whatever it is doing;
//! * an accept that fails for the listener (out of file descriptors, out of memory) is
//!   retried after a backoff of 100 ms doubling to 1 s, logged once per run of failures.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    StatusCode,
    header::{CONTENT_TYPE, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    task::JoinHandle,
};

/// A response: status line (`"200 OK"`), content type, body.
pub type Response = (&'static str, &'static str, String);

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From a connection's start to the end of its request head.
    pub header_timeout: Duration,
    /// A connection's whole life.
    pub connection_timeout: Duration,
}

impl Default for Limits {
    /// 1,024 connections, 5 s for the request head, 30 s a connection.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// What one listener has done, counted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Accepts that failed (each retried after the backoff, or at once for an error of
    /// that one connection).
    pub accept_errors: AtomicU64,
    /// Connections closed to make room for a new one (the oldest still sending its
    /// request head).
    pub evicted: AtomicU64,
    /// New connections closed at once: at the cap, with none to evict.
    pub refused: AtomicU64,
    /// Requests answered.
    pub answered: AtomicU64,
}

/// Serves HTTP on `addr` until the task is aborted: `bound` hears whether it could
/// listen (a failure is the caller's to log, never fatal), then every request's path
/// goes to `answer` (`None`: close without a response). The default [`Limits`] apply.
pub fn serve(
    addr: SocketAddr,
    bound: impl FnOnce(Result<(), &std::io::Error>) + Send + 'static,
    answer: impl Fn(&str) -> Option<Response> + Send + Sync + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => return bound(Err(&e)),
        };
        bound(Ok(()));
        accept_loop(
            listener,
            Limits::default(),
            Arc::new(answer),
            Arc::default(),
        )
        .await;
    })
}

/// Serves HTTP on `listener`, already bound, with `limits`, until the task is aborted;
/// returns the task and its counts.
pub fn serve_listener(
    listener: TcpListener,
    limits: Limits,
    answer: impl Fn(&str) -> Option<Response> + Send + Sync + 'static,
) -> (JoinHandle<()>, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    let task = tokio::spawn(accept_loop(
        listener,
        limits,
        Arc::new(answer),
        stats.clone(),
    ));
    (task, stats)
}

/// Where an evicted connection hands its slot over to the connection that evicted it.
type Handover = oneshot::Sender<OwnedSemaphorePermit>;

/// The connections of one listener: a slot (permit) each, and those still sending
/// their request head, oldest first, each with the way to evict it.
struct Conns {
    slots: Arc<Semaphore>,
    reading: Mutex<BTreeMap<u64, oneshot::Sender<Handover>>>,
    next_id: AtomicU64,
}

impl Conns {
    fn reading(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<Handover>>> {
        self.reading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the oldest connection still sending its request head to close and hand
    /// its slot over; where the slot will come, or `None` when no connection is
    /// sending its request head.
    fn evict_oldest(&self) -> Option<oneshot::Receiver<OwnedSemaphorePermit>> {
        let (mut give, take) = oneshot::channel();
        let mut reading = self.reading();
        while let Some((_, evict)) = reading.pop_first() {
            // A connection that has just ended cannot take it: the next one.
            match evict.send(give) {
                Ok(()) => return Some(take),
                Err(back) => give = back,
            }
        }
        None
    }
}

/// How a new connection gets its slot.
enum Slot {
    /// A free one, taken.
    Taken(OwnedSemaphorePermit),
    /// The one an evicted connection hands over.
    HandedOver(oneshot::Receiver<OwnedSemaphorePermit>),
}

/// Accepts connections on `listener` until the task is aborted.
async fn accept_loop<A>(listener: TcpListener, limits: Limits, answer: Arc<A>, stats: Arc<Stats>)
where
    A: Fn(&str) -> Option<Response> + Send + Sync + 'static,
{
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let conns = Arc::new(Conns {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        reading: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(0),
    });
    let mut backoff = AcceptBackoff::default();
    let mut cap_warned: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                if backoff.succeeded() {
                    tracing::info!("http {addr}: accepting connections again");
                }
                stream
            }
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if let Some((delay, first)) = backoff.failed(&e) {
                    if first {
                        tracing::warn!(
                            "http {addr}: cannot accept connections: {e}; retrying every {:?} at most",
                            AcceptBackoff::MAX
                        );
                    }
                    tokio::time::sleep(delay).await;
                }
                continue;
            }
        };
        let slot = match conns.slots.clone().try_acquire_owned() {
            Ok(permit) => Slot::Taken(permit),
            Err(_) => {
                if cap_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "http {addr}: {} connections open (the cap): the oldest still sending its request is closed for each new one",
                        limits.max_connections
                    );
                    cap_warned = Some(Instant::now());
                }
                let Some(handover) = conns.evict_oldest() else {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                stats.evicted.fetch_add(1, Ordering::Relaxed);
                Slot::HandedOver(handover)
            }
        };
        tokio::spawn(connection(
            stream,
            slot,
            conns.clone(),
            answer.clone(),
            limits,
            stats.clone(),
        ));
    }
}

/// Serves one connection: one request, then close; gone when evicted or past
/// `limits.connection_timeout`.
async fn connection<A>(
    stream: TcpStream,
    slot: Slot,
    conns: Arc<Conns>,
    answer: Arc<A>,
    limits: Limits,
    stats: Arc<Stats>,
) where
    A: Fn(&str) -> Option<Response> + Send + Sync + 'static,
{
    let permit = match slot {
        Slot::Taken(permit) => permit,
        // The evicted connection hands its slot over as soon as it runs; a second at most.
        Slot::HandedOver(handover) => {
            match tokio::time::timeout(Duration::from_secs(1), handover).await {
                Ok(Ok(permit)) => permit,
                _ => return,
            }
        }
    };
    let id = conns.next_id.fetch_add(1, Ordering::Relaxed);
    let (evict, mut evicted) = oneshot::channel::<Handover>();
    conns.reading().insert(id, evict);
    let service = {
        let conns = conns.clone();
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            // The head is in: no longer a candidate for eviction.
            conns.reading().remove(&id);
            let response = answer(req.uri().path());
            if response.is_some() {
                stats.answered.fetch_add(1, Ordering::Relaxed);
            }
            async move { response.map(to_hyper).ok_or(NoAnswer) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(8192)
        .serve_connection(TokioIo::new(stream), service);
    // Once the head is in, `evicted` ends with an error: that branch is then disabled.
    let handover = tokio::select! {
        _ = tokio::time::timeout(limits.connection_timeout, conn) => None,
        Ok(handover) = &mut evicted => Some(handover),
    };
    conns.reading().remove(&id);
    // Evicted just as it ended by itself: the evicting connection still waits for the
    // slot.
    let handover = handover.or_else(|| evicted.try_recv().ok());
    // The connection is closed; its slot goes to the one that evicted it, if any (else
    // back to the listener).
    if let Some(handover) = handover {
        let _ = handover.send(permit);
    }
}

/// The answer was no answer: hyper closes the connection without a response.
#[derive(Debug, thiserror::Error)]
#[error("no answer for this path")]
struct NoAnswer;

/// Our response as hyper's: the status from the status line's code (500 if it has
/// none), the content type, `X-Content-Type-Options: nosniff` (as kube-proxy sends).
fn to_hyper((status, content_type, body): Response) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status
        .get(..3)
        .and_then(|code| StatusCode::from_bytes(code.as_bytes()).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The wait after failed accepts: none for an error of the one connection being
/// accepted (the next one is another), else 100 ms doubling to 1 s until an accept
/// works again.
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    /// After the accept failed with `e`: how long to wait before the next one, and
    /// whether this failure starts a run (to log); `None`: accept again at once.
    fn failed(&mut self, e: &std::io::Error) -> Option<(Duration, bool)> {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
        if matches!(
            e.kind(),
            ConnectionAborted | ConnectionRefused | ConnectionReset
        ) {
            return None;
        }
        let first = self.delay.is_none();
        let delay = self.delay.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.delay = Some(delay);
        Some((delay, first))
    }

    /// After an accept worked: whether it ends a run of failures (to log).
    fn succeeded(&mut self) -> bool {
        self.delay.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_to_a_second_and_log_once() {
        let mut b = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let ms = Duration::from_millis;
        let waits: Vec<_> = (0..6).map(|_| b.failed(&emfile).unwrap()).collect();
        assert_eq!(
            waits,
            [
                (ms(100), true),
                (ms(200), false),
                (ms(400), false),
                (ms(800), false),
                (ms(1000), false),
                (ms(1000), false),
            ]
        );
        assert!(b.succeeded(), "the run of failures ends");
        assert!(!b.succeeded(), "and is logged once");
        assert_eq!(b.failed(&emfile), Some((ms(100), true)), "a new run");
        // One connection's own error: the next accept at once, the run untouched.
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.failed(&aborted), None);
        assert_eq!(b.failed(&emfile), Some((ms(200), false)));
    }

    #[test]
    fn responses_carry_the_status_code_and_content_type() {
        let r = to_hyper(("503 Service Unavailable", "application/json", "{}".into()));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        let r = to_hyper(("bogus", "text/plain", String::new()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
