//! Connection bounds: slow or silent clients are disconnected within their documented bounds
//! (HTTP header read, HTTP idle, HTTP/2 preface after a finished TLS handshake, HTTP/2 idle with
//! no open stream), the broker's descriptors return to their baseline after a hostile run, and
//! a long-lived stream doing its job is never cut — here a KeepAlive stream kept for an hour on
//! the broker's clock, with far longer real gaps between pings than the idle bound.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::{BeginTaskRequest, KeepAliveRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// `[grpc]` and `[http]` keys with short bounds, before the marker `start` splits on.
const BOUNDS: &str = "preface_timeout = \"500ms\"\nidle_timeout = \"1s\"\n\
                      [http]\nheader_read_timeout = \"500ms\"\nidle_timeout = \"1s\"\n\
                      \n#end-grpc-http\n";

/// The tests here count the process's descriptors: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads until the peer closes; returns how long that took (panics after `limit`).
async fn closed_within(mut conn: impl AsyncRead + Unpin, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + limit, conn.read(&mut buf)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn http_addr(b: &TestBroker) -> String {
    b.running
        .endpoints
        .http_addr
        .trim_start_matches("http://")
        .to_owned()
}

#[tokio::test]
async fn slow_and_silent_clients_are_disconnected_within_their_bounds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let b = start(&format!("{BOUNDS}{}", uid_rule())).await;

    // HTTP: a header that never finishes.
    let mut slow = tokio::net::TcpStream::connect(http_addr(&b)).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let took = closed_within(slow, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");

    // HTTP: a keep-alive connection that goes quiet after a request.
    let mut idle = tokio::net::TcpStream::connect(http_addr(&b)).await.unwrap();
    idle.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let took = closed_within(idle, Duration::from_secs(4)).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");

    // TLS: a finished handshake and then no HTTP/2 preface.
    let silent = tls_handshake(&b, &b.running.broker.ca().keys().roots).await;
    let took = closed_within(silent, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");

    // Unix: a connection that never speaks.
    let mute = tokio::net::UnixStream::connect(b.socket()).await.unwrap();
    closed_within(mute, Duration::from_secs(3)).await;

    // HTTP/2 on the Unix socket: one request answered, then no stream open.
    let mut h2 = tokio::net::UnixStream::connect(b.socket()).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let block = loona_hpack::Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/grpc.health.v1.Health/Check"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]);
    let len = block.len();
    hello.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        0x1,
        0x4,
        0,
        0,
        0,
        1,
    ]);
    hello.extend_from_slice(&block);
    hello.extend_from_slice(&[0, 0, 5, 0x0, 0x1, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    h2.write_all(&hello).await.unwrap();
    let took = closed_within(h2, Duration::from_secs(4)).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_hostile_run_leaves_descriptors_at_their_baseline() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let b = start(&format!("{BOUNDS}{}", uid_rule())).await;
    // Warm up what the process opens once (runtime threads, the CRL thread, pools).
    let _ = b.http_get("/livez").await;
    drop(tls_handshake(&b, &b.running.broker.ca().keys().roots).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = open_fds();

    let mut held = Vec::new();
    for _ in 0..20 {
        let mut slow = tokio::net::TcpStream::connect(http_addr(&b)).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(tokio::spawn(closed_within(slow, Duration::from_secs(5))));
        let silent = tls_handshake(&b, &b.running.broker.ca().keys().roots).await;
        held.push(tokio::spawn(closed_within(silent, Duration::from_secs(5))));
        let mute = tokio::net::UnixStream::connect(b.socket()).await.unwrap();
        held.push(tokio::spawn(closed_within(mute, Duration::from_secs(5))));
    }
    assert!(
        open_fds() >= baseline + 60 * 2 - 10,
        "both ends of each connection are open"
    );
    // Every one of them is closed by the broker within its bound...
    for h in held {
        h.await.unwrap();
    }
    // ...and with our ends dropped, the process is back where it started.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds() <= baseline,
        "{} descriptors open, {baseline} before the hostile run",
        open_fds()
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_keep_alive_stream_idle_between_pings_survives_an_hour() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let b = start(&format!(
        "{BOUNDS}{}[tasks]\nheartbeat_interval = \"20m\"\ngrace = \"20m\"\nmax_duration = \"3h\"\n",
        uid_rule()
    ))
    .await;
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest {
            max_duration_seconds: Some(2 * 3600),
            ..BeginTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(KeepAliveRequest {
        task_id: task.task_id.clone(),
    })
    .await
    .unwrap();
    let mut answers = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    answers.message().await.unwrap().unwrap();
    // Four pings 15 minutes apart on the broker's clock, each after a real gap longer than
    // the 1s idle bound: the open stream keeps the connection, and the task, alive.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        b.clock.advance(Duration::from_secs(15 * 60));
        tx.send(KeepAliveRequest {
            task_id: String::new(),
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .expect("the keep-alive answers")
            .expect("the stream is still open")
            .expect("and has not ended");
    }
    b.running.shutdown().await.unwrap();
}
