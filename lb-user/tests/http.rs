//! The agent's HTTP server (serve::http) under hostile clients, in-process on 127.0.0.1:
//! 2,000 slow connections, a request head trickled byte by byte, accepts without file
//! descriptors. No root needed.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use lb_user::serve::{
    http::{self, Limits, Stats},
    proxier_health::{self, ProxierHealth, SharedHealth},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// A healthy agent's health: synced just now.
fn healthy() -> SharedHealth {
    let mut h = ProxierHealth::new(Duration::from_secs(60), SystemTime::now());
    h.updated(SystemTime::now());
    Arc::new(Mutex::new(h))
}

/// `/healthz` and `/livez` served with `limits` on a free port of 127.0.0.1.
async fn start(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<Stats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = healthy();
    let (task, stats) = http::serve_listener(listener, limits, move |path| {
        Some(proxier_health::answer(&health, path))
    });
    (addr, task, stats)
}

/// GET `path` on `addr`, the whole response within 5 s; `None` if the connection
/// failed or gave no response in time.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// Raises this process's soft RLIMIT_NOFILE to at least `want` (at most the hard limit).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_two_thousand_slow_connections_are_open() {
    // 2,000 client sockets and up to 1,024 server ones, with room to spare.
    raise_nofile(8192);
    // The default cap, and a header timeout that outlasts the 2,000 connects however slow
    // the machine (a kernel under emulation takes longer than the default 5 s): the cap
    // evicts slow connections here, not the timeout.
    let limits = Limits {
        header_timeout: Duration::from_secs(60),
        connection_timeout: Duration::from_secs(120),
        ..Limits::default()
    };
    let (addr, task, stats) = start(limits).await;
    // Half hold an incomplete head, half send a byte a second (slowloris).
    let mut slow = Vec::new();
    for i in 0..2000 {
        let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr));
        let mut s = connect.await.expect("connect in time").expect("connect");
        let head = if i % 2 == 0 {
            "GET /healthz HTTP/1.1\r\nHost: x\r\n"
        } else {
            "G"
        };
        let _ = s.write_all(head.as_bytes()).await;
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for s in slow.iter_mut().skip(1).step_by(2) {
                let _ = tokio::time::timeout(Duration::from_millis(10), s.write_all(b"E")).await;
            }
        }
        slow
    });
    // The slow ones are all still open on the client side: /healthz answers at once.
    let answer = get(addr, "/healthz").await;
    let answer = answer.expect("/healthz answers beside 2,000 slow connections");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"nodeEligible\":true"), "{answer}");
    assert!(
        stats.evicted.load(Ordering::Relaxed) > 0,
        "the cap held: connections past it evicted slow ones ({stats:?})"
    );
    assert_eq!(stats.answered.load(Ordering::Relaxed), 1, "{stats:?}");
    // And again while the trickle goes on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answer = get(addr, "/livez").await.expect("/livez answers");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    trickle.abort();
    task.abort();
}

/// Sends `head` one byte each 200 ms (50 bytes at most) until the server closes the
/// connection; returns how many bytes went out, whether the server closed the
/// connection before they all did, and what came back.
async fn trickle(addr: SocketAddr, head: &[u8]) -> (usize, bool, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let read = rx.read_to_end(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(15), read).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let (mut sent, mut closed) = (0, false);
    for byte in head.iter().take(50) {
        if reader.is_finished() || tx.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (sent, closed, reader.await.unwrap())
}

#[tokio::test]
async fn a_request_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (addr, task, stats) = start(limits).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: one-byte-at-a-time\r\n\r\n";
    // 10 s of trickling at most, against a 1 s timeout.
    let (sent, closed, reply) = trickle(addr, head).await;
    assert!(
        closed,
        "the server closed the connection (after {sent} bytes)"
    );
    assert!(!reply.contains("200 OK"), "{reply}");
    assert_eq!(stats.answered.load(Ordering::Relaxed), 0, "{stats:?}");
    // A connection that sends nothing is closed too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection is closed: {closed:?}"
    );
    // The control: the same head sent at once is answered.
    let answer = get(addr, "/healthz").await.expect("answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    task.abort();
}

/// Set in the child process that runs [`accept_without_file_descriptors`].
const CHILD_ENV: &str = "LB_HTTP_TEST_EMFILE_CHILD";

#[test]
fn accepts_without_file_descriptors_back_off_and_recover() {
    // The file-descriptor limit is the process's: lowered in a child of its own, which
    // runs the test below.
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "accept_without_file_descriptors",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child test did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran the test: {text}");
}

#[test]
#[ignore = "run in a process of its own by accepts_without_file_descriptors_back_off_and_recover"]
fn accept_without_file_descriptors() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (addr, task, stats) = start(Limits::default()).await;
        let files = use_up_file_descriptors();
        // The client takes the one descriptor left: the server cannot accept it.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let errors = stats.accept_errors.load(Ordering::Relaxed);
        // 100 ms, 200, 400, 800, then 1 s apart: about 5 in 3 s (a spinning loop
        // makes hundreds of thousands).
        assert!((1..=12).contains(&errors), "{errors} failed accepts in 3 s");
        // Descriptors again: the waiting connection is served.
        drop(files);
        let exchange = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            client.set_read_timeout(Some(Duration::from_secs(10)))?;
            client.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            client.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        });
        let answer = exchange.await.unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        task.abort();
    });
}

/// Lowers RLIMIT_NOFILE to 256 and opens /dev/null until no descriptor is left, then
/// closes one: the files to drop for the descriptors back.
fn use_up_file_descriptors() -> Vec<std::fs::File> {
    let lim = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut files = Vec::new();
    for _ in 0..256 {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
    assert!(
        std::fs::File::open("/dev/null").is_err(),
        "descriptors used up"
    );
    files.pop();
    files
}
