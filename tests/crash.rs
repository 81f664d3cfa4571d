//! Crash safety: a broker process under mixed load is SIGKILLed again and again (20 times here;
//! `EPHEMERA_CRASH_KILLS=200 cargo test --test crash` for a longer run) and restarted on the same
//! data. Afterwards every credential a client received has a lease with the right task and
//! expiry, every task a client was given exists with its deadline, no serial or jti was issued
//! twice, and after a restart tasks past their deadline are ended while live ones get a fresh
//! grace period (DESIGN.md §4).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, MintJwtSvidRequest, MintX509SvidRequest,
};
use ephemera::client::ConnectOptions;
use ephemera::store::{Store, TaskState};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

/// What a client was handed.
#[derive(Debug, Clone)]
enum Received {
    Task {
        id: String,
        deadline: i64,
    },
    Jwt {
        jti: String,
        task: Option<String>,
        exp: i64,
    },
    X509 {
        serial: String,
        lease: String,
        task: Option<String>,
        exp: i64,
    },
}

fn start(dir: &Path, config: &Path) -> Child {
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("endpoints.json").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("broker exited: {status}");
        }
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

async fn client(dir: &Path) -> Option<BrokerClient<Channel>> {
    ConnectOptions {
        socket: Some(dir.join("broker.sock")),
        ..ConnectOptions::default()
    }
    .broker()
    .await
    .ok()
}

/// Waits until the broker answers a request (the first one pays for lazy initialization).
async fn warm_up(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(mut c) = client(dir).await
            && c.mint_jwt_svid(MintJwtSvidRequest {
                audience: vec!["warm-up".into()],
                ..MintJwtSvidRequest::default()
            })
            .await
            .is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "broker never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One client's load until its connection breaks: tasks, credentials in them, standalone
/// credentials, some tasks ended.
async fn load(dir: std::path::PathBuf, seed: u64, got: Arc<Mutex<Vec<Received>>>) {
    let Some(mut c) = client(&dir).await else {
        return;
    };
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    loop {
        let short = next() % 3 == 0;
        let task = match c
            .begin_task(BeginTaskRequest {
                max_duration_seconds: Some(if short { 1 } else { 600 }),
                ..BeginTaskRequest::default()
            })
            .await
        {
            Ok(t) => t,
            Err(_) => return,
        };
        let task = task.into_inner();
        got.lock().unwrap().push(Received::Task {
            id: task.task_id.clone(),
            deadline: task.deadline,
        });
        for in_task in [true, next() % 4 == 0] {
            let task_id = if in_task {
                task.task_id.clone()
            } else {
                String::new()
            };
            let Ok(j) = c
                .mint_jwt_svid(MintJwtSvidRequest {
                    audience: vec!["crash".into()],
                    task_id: task_id.clone(),
                    ..MintJwtSvidRequest::default()
                })
                .await
            else {
                return;
            };
            let j = j.into_inner();
            got.lock().unwrap().push(Received::Jwt {
                jti: j.jti,
                task: in_task.then(|| task.task_id.clone()),
                exp: j.expires_at,
            });
            let Ok(x) = c
                .mint_x509_svid(MintX509SvidRequest {
                    task_id,
                    ..MintX509SvidRequest::default()
                })
                .await
            else {
                return;
            };
            let x = x.into_inner();
            got.lock().unwrap().push(Received::X509 {
                serial: x.serial,
                lease: x.lease_id,
                task: in_task.then(|| task.task_id.clone()),
                exp: x.expires_at,
            });
        }
        if next() % 5 == 0
            && c.end_task(EndTaskRequest {
                task_id: task.task_id.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_loses_no_lease_and_recovers_tasks() {
    let kills: usize = std::env::var("EPHEMERA_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20);
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    ephemera::ca::keys::init(
        &dir,
        &TD.parse().unwrap(),
        ephemera::ca::keys::InitOptions::default(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    std::fs::create_dir(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/all.cedar"), ALLOW_ALL).unwrap();
    let config = dir.join("ephemera.toml");
    std::fs::write(
        &config,
        format!(
            // The grace is long enough that the tasks refreshed at the last restart are
            // still live when it is checked, whatever second the restart fell in (store times
            // are whole seconds).
            "{}{}\n[tasks]\nheartbeat_interval = \"1s\"\ngrace = \"5s\"\n",
            config_text(&dir, ""),
            uid_rule()
        ),
    )
    .unwrap();

    let got = Arc::new(Mutex::new(Vec::new()));
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..kills {
        let mut broker = start(&dir, &config);
        warm_up(&dir).await;
        let clients: Vec<_> = (0..6)
            .map(|i| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
                tokio::spawn(load(dir.clone(), seed, got.clone()))
            })
            .collect();
        // Kill mid-flight, at a different moment each round.
        tokio::time::sleep(Duration::from_millis(100 + (seed >> 33) % 300)).await;
        broker.kill().unwrap();
        broker.wait().unwrap();
        for c in clients {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
        let _ = round;
    }
    let received = got.lock().unwrap().clone();
    let credentials = received
        .iter()
        .filter(|r| !matches!(r, Received::Task { .. }))
        .count();
    assert!(
        credentials > kills * 10,
        "load reached the broker: {credentials}"
    );

    // One more restart: tasks past their deadline end, live ones get a fresh grace.
    let restarted_at = unix_now();
    let mut broker = start(&dir, &config);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker.kill().unwrap();
    broker.wait().unwrap();

    let store = ephemera::store::sqlite::SqliteStore::open(&dir.join("ephemera.db"))
        .await
        .unwrap();
    let (mut jtis, mut serials) = (HashSet::new(), HashSet::new());
    let (mut past, mut live) = (0, 0);
    for r in &received {
        match r {
            Received::Task { id, deadline } => {
                let t = store
                    .task(id)
                    .await
                    .unwrap()
                    .expect("a task given out exists");
                assert_eq!(t.deadline, *deadline);
                if *deadline < restarted_at {
                    assert_ne!(t.state, TaskState::Active, "task {id} past its deadline");
                    past += 1;
                } else if t.state == TaskState::Active {
                    assert!(t.due_at >= restarted_at, "live task {id} got a fresh grace");
                    live += 1;
                }
            }
            Received::Jwt { jti, task, exp } => {
                assert!(jtis.insert(jti.clone()), "jti {jti} issued twice");
                let l = store
                    .lease(jti)
                    .await
                    .unwrap()
                    .expect("every JWT has a lease");
                assert_eq!((&l.lease.task_id, l.lease.expires_at), (task, *exp));
            }
            Received::X509 {
                serial,
                lease,
                task,
                exp,
            } => {
                assert!(
                    serials.insert(serial.clone()),
                    "serial {serial} issued twice"
                );
                let l = store
                    .lease(serial)
                    .await
                    .unwrap()
                    .expect("every certificate has a lease");
                assert_eq!(&l.lease.id, lease);
                assert_eq!((&l.lease.task_id, l.lease.expires_at), (task, *exp));
            }
        }
    }
    assert!(
        past > 0 && live > 0,
        "both kinds of task checked: {past} past, {live} live"
    );
    eprintln!(
        "{kills} kills: {credentials} credentials and {} tasks checked ({past} past deadline, {live} live)",
        received.len() - credentials
    );
}
