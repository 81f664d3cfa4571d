//! Several broker processes on one PostgreSQL database (`EPHEMERA_TEST_POSTGRES_URL`; skipped
//! without it): a task ended on one replica is inactive at the other's introspection and on its
//! watch stream within a second; a SIGKILLed replica's tasks are reaped by the survivor exactly
//! once; killed database sessions and a database that refuses connections make requests fail
//! with `Unavailable` and `/readyz` report not ready, and service resumes without a restart;
//! replicas racing to rotate a key make one successor, and a key revoked on one replica is
//! withdrawn on the other, which replaces the SVID a live Workload API stream holds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, KeepAliveRequest, ListLeasesRequest, MintJwtSvidRequest,
    WatchRequest,
};
use ephemera::client::ConnectOptions;
use ephemera::endpoints::Endpoints;
use ephemera::store::postgres::testing;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

/// One `ephemera serve` process.
struct Replica {
    child: Child,
    _dir: tempfile::TempDir,
    endpoints: Endpoints,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA shared by every replica of a test, as a mounted secret would be.
fn shared_keys() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ephemera::ca::keys::init(
        dir.path(),
        &TD.parse().unwrap(),
        ephemera::ca::keys::InitOptions::default(),
        SystemTime::now(),
    )
    .unwrap();
    // What `ca init` writes besides the CA: the admin token and the page-token secret.
    let data = ephemera::datadir::DataDir::new(dir.path());
    ephemera::api::admin::create_token_file(&data.admin_token()).unwrap();
    ephemera::api::admin::load_or_create_secret(&data.admin_pages_key()).unwrap();
    dir
}

impl Replica {
    fn start(keys: &Path, db_url: &str) -> Self {
        Self::start_with(keys, db_url, "")
    }

    /// A replica whose config also has `extra` (tables after the mapping).
    fn start_with(keys: &Path, db_url: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(keys).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/all.cedar"), ALLOW_ALL).unwrap();
        let config = format!(
            "{}\n[store]\nurl = \"{db_url}\"\nmax_connections = 4\nacquire_timeout = \"1s\"\n\
             [tasks]\nheartbeat_interval = \"1s\"\ngrace = \"2s\"\n{}\n{extra}",
            config_text(dir.path(), ""),
            uid_rule()
        );
        let path = dir.path().join("ephemera.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoints = loop {
            if let Ok(e) = Endpoints::read(dir.path()) {
                break e;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("replica exited early: {status}");
            }
            assert!(Instant::now() < deadline, "replica did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            _dir: dir,
            endpoints,
        }
    }

    async fn channel(&self) -> Channel {
        ConnectOptions {
            socket: Some(self.endpoints.broker_socket.clone()),
            ..ConnectOptions::default()
        }
        .connect()
        .await
        .unwrap()
    }

    async fn broker(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

async fn database(test: &str) -> Option<String> {
    let server = testing::server_url(test)?;
    Some(testing::fresh_database(&server).await.unwrap())
}

async fn admin_connection(db_url: &str) -> sqlx::PgConnection {
    let options = ephemera::store::postgres::connect_options(db_url).unwrap();
    sqlx::ConnectOptions::connect(&options).await.unwrap()
}

fn jwt(task: &str) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        ttl_seconds: Some(600),
        task_id: task.into(),
        ..MintJwtSvidRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_ended_on_one_replica_is_ended_on_the_other() {
    let Some(db) = database("a_task_ended_on_one_replica_is_ended_on_the_other").await else {
        return;
    };
    let keys = shared_keys();
    let (a, b) = (
        Replica::start(keys.path(), &db),
        Replica::start(keys.path(), &db),
    );
    let mut watch_a = RevocationsClient::new(a.channel().await)
        .watch(WatchRequest { cursor: None })
        .await
        .unwrap()
        .into_inner();

    let mut on_a = a.broker().await;
    let task = on_a
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let token = on_a
        .mint_jwt_svid(jwt(&task.task_id))
        .await
        .unwrap()
        .into_inner();
    let live = http_post_form(
        &a.endpoints.http_addr,
        "/introspect",
        &format!("token={}", token.token),
    )
    .await;
    assert!(live.1.contains("\"active\":true"), "{}", live.1);

    // Ended through B; A learns of it.
    let ended = Instant::now();
    b.broker()
        .await
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap();
    // At once, before A has necessarily heard of it (A holds the task in memory from the mint
    // above): A refuses to mint into the ended task, since the lease write checks the task.
    let late = on_a.mint_jwt_svid(jwt(&task.task_id)).await.unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    let event = tokio::time::timeout(Duration::from_secs(1), watch_a.message())
        .await
        .expect("A's watch stream delivers B's revocation within 1s")
        .unwrap()
        .unwrap();
    let delay = ended.elapsed();
    assert_eq!(event.task_id, task.task_id);
    assert!(event.credentials.iter().any(|c| c.jti == token.jti));
    let (_, body) = http_post_form(
        &a.endpoints.http_addr,
        "/introspect",
        &format!("token={}", token.token),
    )
    .await;
    assert!(body.contains("\"active\":false"), "{body}");
    eprintln!("revocation on B reached A's watcher in {delay:?}");

    // Admin listings page across replicas: a page token from A continues on B.
    on_a.mint_jwt_svid(jwt("")).await.unwrap();
    let admin_token = std::fs::read_to_string(keys.path().join("admin.token")).unwrap();
    let as_admin = |page_token: String| {
        let mut req = tonic::Request::new(ListLeasesRequest {
            page_size: 1,
            page_token,
            ..ListLeasesRequest::default()
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", admin_token.trim()).parse().unwrap(),
        );
        req
    };
    let first = AdminClient::new(a.channel().await)
        .list_leases(as_admin(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.leases.len(), 1);
    let second = AdminClient::new(b.channel().await)
        .list_leases(as_admin(first.next_page_token))
        .await
        .expect("B accepts A's page token")
        .into_inner();
    assert_eq!(second.leases.len(), 1);
    assert_ne!(first.leases[0].id, second.leases[0].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn survivors_reap_a_killed_replicas_tasks_exactly_once() {
    let Some(db) = database("survivors_reap_a_killed_replicas_tasks_exactly_once").await else {
        return;
    };
    let keys = shared_keys();
    let mut a = Replica::start(keys.path(), &db);
    let b = Replica::start(keys.path(), &db);
    let mut watch_b = RevocationsClient::new(b.channel().await)
        .watch(WatchRequest { cursor: None })
        .await
        .unwrap()
        .into_inner();

    // Five tasks kept alive through A; one kept alive through B that must survive.
    let mut on_a = a.broker().await;
    let mut ids = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..5 {
        let t = on_a
            .begin_task(BeginTaskRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(KeepAliveRequest {
            task_id: t.task_id.clone(),
        })
        .await
        .unwrap();
        let resp = on_a
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap();
        streams.push((tx, resp));
        ids.push(t.task_id);
    }
    let mut on_b = b.broker().await;
    let kept = on_b
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (keep_tx, keep_rx) = tokio::sync::mpsc::channel(4);
    keep_tx
        .send(KeepAliveRequest {
            task_id: kept.task_id.clone(),
        })
        .await
        .unwrap();
    let _keep = on_b
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(keep_rx))
        .await
        .unwrap();
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if keep_tx.send(KeepAliveRequest::default()).await.is_err() {
                return;
            }
        }
    });

    // A is killed right after its keep-alive writes (heartbeat 1s, grace 2s).
    a.sigkill();
    let killed = tokio::time::Instant::now();
    drop(streams);

    // B's reaper ends each of A's tasks within the documented bound: no earlier than
    // heartbeat + grace after the last ping, no later than heartbeat + 1.5 × grace (plus the
    // reaper's one-second pass and the watch's delivery).
    let mut seen = std::collections::HashMap::<String, u32>::new();
    let deadline = killed + Duration::from_secs(15);
    while seen.len() < ids.len() {
        let ev = tokio::time::timeout_at(deadline, watch_b.message())
            .await
            .expect("B reaps A's tasks within 15s")
            .unwrap()
            .unwrap();
        let after = killed.elapsed();
        assert!(
            // Store times are whole seconds and the last ping came a moment before the kill.
            after >= Duration::from_millis(2500) && after <= Duration::from_millis(7500),
            "a silent task ended {after:?} after its last ping; the bound is 3s to 4s (+ the reaper's pass)"
        );
        assert_eq!(ev.reason, "keep-alive lost");
        *seen.entry(ev.task_id).or_default() += 1;
    }
    // A little longer: no second event for any of them, and B's own task is alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut conn = admin_connection(&db).await;
    for id in &ids {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM revocations WHERE task_id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1, "task {id} revoked exactly once");
    }
    let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(&kept.task_id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(state, "active", "the task kept alive through B lives on");
    pinger.abort();
}

async fn readyz(r: &Replica) -> u16 {
    http_get(&r.endpoints.http_addr, "/readyz").await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outages_fail_cleanly_and_recover_without_restart() {
    let Some(db) = database("database_outages_fail_cleanly_and_recover_without_restart").await
    else {
        return;
    };
    let name = db
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let keys = shared_keys();
    let a = Replica::start(keys.path(), &db);
    let mut client = a.broker().await;
    client.mint_jwt_svid(jwt("")).await.unwrap();
    assert_eq!(readyz(&a).await, 200);

    // 1. Every broker session is terminated: requests fail with Unavailable or succeed, never
    //    anything else, and succeed again by themselves.
    let mut admin = admin_connection(&format!("{}/postgres", db.rsplit_once('/').unwrap().0)).await;
    let kill = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    );
    sqlx::query(sqlx::AssertSqlSafe(kill.clone()))
        .execute(&mut admin)
        .await
        .unwrap();
    let recovered = recover(&mut client).await;
    eprintln!("after pg_terminate_backend: minting again after {recovered:?}");

    // 2. The database refuses connections: mints and task starts fail with Unavailable and no
    //    lease is written; /readyz says not ready.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(kill.clone()))
        .execute(&mut admin)
        .await
        .unwrap();
    for _ in 0..3 {
        let err = client.mint_jwt_svid(jwt("")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
        let err = client
            .begin_task(BeginTaskRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{}", err.message());
    }
    assert_eq!(readyz(&a).await, 503);

    // 3. The database is back: the same broker serves again, no restart.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let recovered = recover(&mut client).await;
    eprintln!("after the database returned: minting again after {recovered:?}");
    assert_eq!(readyz(&a).await, 200);
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    client.mint_jwt_svid(jwt(&task.task_id)).await.unwrap();

    // 4. The database turns read-only (as a standby does after a failover): nothing is issued,
    //    /readyz's write probe says not ready; writable again, service resumes.
    let read_only = |on: bool| {
        sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = {on}"
        ))
    };
    sqlx::query(read_only(true))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(kill.clone()))
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.mint_jwt_svid(jwt("")).await {
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
                break;
            }
            // A connection opened before the change may still write once.
            Ok(_) => assert!(
                Instant::now() < deadline,
                "still issuing on a read-only database"
            ),
        }
    }
    assert_eq!(readyz(&a).await, 503, "not ready on a read-only database");
    sqlx::query(read_only(false))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(kill))
        .execute(&mut admin)
        .await
        .unwrap();
    recover(&mut client).await;
    assert_eq!(readyz(&a).await, 200);
}

/// Mints until it works (bounded); every failure on the way must be `Unavailable`.
async fn recover(client: &mut BrokerClient<Channel>) -> Duration {
    let started = Instant::now();
    loop {
        match client.mint_jwt_svid(jwt("")).await {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
                assert!(
                    started.elapsed() < Duration::from_secs(15),
                    "no recovery within 15s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lock_created_on_one_replica_stops_the_identity_on_the_other() {
    use ephemera::api::pb::v1::CreateLockRequest;
    let Some(db) = database("a_lock_created_on_one_replica_stops_the_identity_on_the_other").await
    else {
        return;
    };
    let keys = shared_keys();
    let (a, b) = (
        Replica::start(keys.path(), &db),
        Replica::start(keys.path(), &db),
    );
    let mut on_b = b.broker().await;
    let token = on_b.mint_jwt_svid(jwt("")).await.unwrap().into_inner();
    let task = on_b
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (keep_tx, keep_rx) = tokio::sync::mpsc::channel(4);
    keep_tx
        .send(KeepAliveRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap();
    let mut keep_alive = on_b
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(keep_rx))
        .await
        .unwrap()
        .into_inner();
    keep_alive.message().await.unwrap().expect("first ack");

    let admin_token = std::fs::read_to_string(keys.path().join("admin.token")).unwrap();
    let mut req = tonic::Request::new(CreateLockRequest {
        target: format!("claim:uid={}", my_uid()),
        reason: "incident 7".into(),
        ttl_seconds: None,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", admin_token.trim()).parse().unwrap(),
    );
    let locked = Instant::now();
    let created = AdminClient::new(a.channel().await)
        .create_lock(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.task_ids, std::slice::from_ref(&task.task_id));
    assert_eq!(created.credentials_revoked, 1);

    // B refuses within a second...
    let refused = loop {
        match on_b.mint_jwt_svid(jwt("")).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    locked.elapsed() < Duration::from_secs(1),
                    "B still minting 1s after the lock"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let delay = locked.elapsed();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(refused.message(), "locked: incident 7");
    // ...the task's keep-alive stream on B ends...
    let ended = tokio::time::timeout(Duration::from_secs(1), keep_alive.message())
        .await
        .expect("B's keep-alive stream ends within 1s");
    assert!(
        matches!(&ended, Err(s) if s.message().contains("locked: incident 7")),
        "{ended:?}"
    );
    // ...and what B issued before is inactive at B.
    let (_, body) = http_post_form(
        &b.endpoints.http_addr,
        "/introspect",
        &format!("token={}", token.token),
    )
    .await;
    assert!(body.contains("\"active\":false"), "{body}");
    eprintln!("a lock created on A refused mints on B after {delay:?}");
    drop(keep_tx);
}

/// `RotateSigningKey` / `RevokeSigningKey` / `ListSigningKeys` with the admin token.
fn as_admin<T>(keys: &Path, msg: T) -> tonic::Request<T> {
    let token = std::fs::read_to_string(keys.join("admin.token")).unwrap();
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.lines().next().unwrap().trim())
            .parse()
            .unwrap(),
    );
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_rotate_once_and_a_key_revoked_on_one_is_withdrawn_on_the_other() {
    use ephemera::api::pb::v1::{
        ListSigningKeysRequest, RevokeSigningKeyRequest, RotateSigningKeyRequest,
    };
    use tokio_stream::StreamExt;
    let Some(db) =
        database("replicas_rotate_once_and_a_key_revoked_on_one_is_withdrawn_on_the_other").await
    else {
        return;
    };
    let keys = shared_keys();
    let online = "[ca]\nroot_key = \"online\"\n";
    let (a, b) = (
        Replica::start_with(keys.path(), &db, online),
        Replica::start_with(keys.path(), &db, online),
    );

    // Both replicas asked to rotate the JWT key at once: one successor, the same answer.
    let rotate = |channel: Channel| {
        let req = as_admin(
            keys.path(),
            RotateSigningKeyRequest {
                kind: "jwt".into(),
                immediately: false,
            },
        );
        async move {
            AdminClient::new(channel)
                .rotate_signing_key(req)
                .await
                .unwrap()
                .into_inner()
        }
    };
    let (ca, cb) = (a.channel().await, b.channel().await);
    let (ra, rb) = tokio::join!(rotate(ca), rotate(cb));
    assert_eq!(ra.id, rb.id, "one successor");
    let listed = AdminClient::new(b.channel().await)
        .list_signing_keys(as_admin(keys.path(), ListSigningKeysRequest {}))
        .await
        .unwrap()
        .into_inner();
    let prepared: Vec<&str> = listed
        .keys
        .iter()
        .filter(|k| k.kind == "jwt" && k.state == "prepared")
        .map(|k| k.id.as_str())
        .collect();
    assert_eq!(prepared, [ra.id.as_str()]);

    // A Workload API client (the `spiffe` crate) on B holds an X.509-SVID; B minted a JWT.
    let client = spiffe::WorkloadApiClient::connect_to(format!(
        "unix://{}",
        b.endpoints.workload_socket.as_ref().unwrap().display()
    ))
    .await
    .unwrap();
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = contexts.next().await.unwrap().unwrap();
    let (chain, _) = context_chain_and_roots(&first);
    let intermediate = key_id(&chain[1]);
    let serial = hex(x509_parser::parse_x509_certificate(&chain[0])
        .unwrap()
        .1
        .raw_serial());
    let token = b
        .broker()
        .await
        .mint_jwt_svid(jwt(""))
        .await
        .unwrap()
        .into_inner();

    // Revoked on A.
    let admin_a = a.channel().await;
    let revoke = |id: String| {
        let channel = admin_a.clone();
        let req = as_admin(
            keys.path(),
            RevokeSigningKeyRequest {
                id,
                reason: "leaked in incident 9".into(),
            },
        );
        async move {
            AdminClient::new(channel)
                .revoke_signing_key(req)
                .await
                .unwrap()
                .into_inner()
        }
    };
    let revoked = revoke(intermediate.clone()).await;
    assert!(revoked.credentials_revoked >= 1);
    let jwt_key = token_kid(&token.token);
    let revoked_jwt = revoke(jwt_key).await;
    assert!(revoked_jwt.credentials_revoked >= 1);

    // B's stream holds a replacement under another intermediate, verifying against the
    // bundle it came with.
    let replaced = replacement_not_under(&mut contexts, &intermediate).await;
    verify_chain(&replaced.0, &replaced.1, SystemTime::now());

    // B's CRL for the revoked intermediate lists the old SVID; B's introspection refuses the
    // token of the revoked JWT key.
    let (status, der) =
        http_get_bytes(&b.endpoints.http_addr, &format!("/crl/{intermediate}")).await;
    assert_eq!(status, 200);
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    assert!(
        crl.iter_revoked_certificates()
            .any(|r| hex(r.raw_serial()) == serial),
        "B's CRL lists {serial}"
    );
    let (_, body) = http_post_form(
        &b.endpoints.http_addr,
        "/introspect",
        &format!("token={}", token.token),
    )
    .await;
    assert!(body.contains("\"active\":false"), "{body}");
    let (_, jwks) = http_get(&b.endpoints.http_addr, "/keys").await;
    assert!(!jwks.contains(&token_kid(&token.token)), "{jwks}");
}

/// The `kid` of a compact JWS.
fn token_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}
