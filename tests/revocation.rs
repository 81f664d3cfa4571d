//! What relying parties see: after a task ends its JWT is `active: false` at /introspect, its
//! certificate fails a CRL check, and the watch stream delivers each event once, in order,
//! resumable from a cursor. A policy reload that forbids a live task revokes it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, IntrospectRequest, MintJwtSvidRequest, MintX509SvidRequest,
    WatchRequest,
};
use ephemera::clock::Clock;

#[tokio::test]
async fn ending_a_task_reaches_introspection_crl_and_watchers() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut watcher = RevocationsClient::new(b.tls_channel().await);
    let mut stream = watcher
        .watch(WatchRequest { cursor: None })
        .await
        .unwrap()
        .into_inner();

    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["deploy".into()],
            task_id: task.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Live: active at both introspection endpoints, certificate passes a CRL check.
    let live = introspect_http(&b, &jwt.token).await;
    assert_eq!(live["active"], true);
    assert_eq!(live["jti"], jwt.jti.as_str());
    assert_eq!(live["task_id"], task.task_id.as_str());
    let (_, crl) = http_get_bytes(&b.running.endpoints.http_addr, "/crl").await;
    check_with_crl(&x.cert_chain, &x.bundle, &crl, b.clock.now()).expect("live certificate passes");

    client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap();

    // The watcher hears of it, with both credentials.
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.task_id, task.task_id);
    assert_eq!(ev.reason, "ended by its owner");
    let mut ids: Vec<&str> = ev.credentials.iter().map(|c| c.lease_id.as_str()).collect();
    ids.sort();
    let mut want = vec![jwt.jti.as_str(), x.lease_id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(ev.credentials.iter().any(|c| c.serial == x.serial));
    assert!(ev.credentials.iter().any(|c| c.jti == jwt.jti));

    // Introspection: inactive, over HTTP (RFC 7662) and gRPC.
    assert_eq!(
        introspect_http(&b, &jwt.token).await,
        serde_json::json!({"active": false})
    );
    let grpc = watcher
        .introspect(IntrospectRequest {
            token: jwt.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!grpc.active);

    // The CRL lists the serial, and webpki refuses the certificate with it.
    let crl = crl_listing(&b, &x.serial).await;
    assert!(matches!(
        check_with_crl(&x.cert_chain, &x.bundle, &crl, b.clock.now()),
        Err(webpki::Error::CertRevoked)
    ));
    // The CRL is signed by the intermediate CA.
    let (_, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
    let (_, inter) = x509_parser::parse_x509_certificate(&x.cert_chain[1]).unwrap();
    parsed.verify_signature(inter.public_key()).unwrap();
    // The list kept from events is the one the store gives when read afresh.
    let listed = |der: &[u8]| {
        let (_, crl) = x509_parser::parse_x509_crl(der).unwrap();
        let mut serials: Vec<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        serials.sort();
        serials
    };
    b.running
        .broker
        .crl()
        .rebuild(ephemera::lease::crl::CrlSource::Store)
        .await
        .unwrap();
    assert_eq!(listed(&crl), listed(&b.running.broker.crl().current()));

    // Garbage, foreign and tampered tokens are simply inactive.
    let mut tampered = jwt.token.clone();
    tampered.pop();
    for t in ["", "garbage", "a.b.c", tampered.as_str()] {
        assert_eq!(
            introspect_http(&b, t).await,
            serde_json::json!({"active": false}),
            "{t}"
        );
    }
    let (status, body) = http_post_form(
        &b.running.endpoints.http_addr,
        "/introspect",
        "nonsense=%%%",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"active":false}"#));
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_delivers_each_event_once_in_order_and_resumes_without_gaps() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(
            client
                .begin_task(BeginTaskRequest::default())
                .await
                .unwrap()
                .into_inner()
                .task_id,
        );
    }
    // Three revocations before anyone watches.
    for t in &tasks[..3] {
        client
            .end_task(EndTaskRequest { task_id: t.clone() })
            .await
            .unwrap();
    }
    let mut watcher = RevocationsClient::new(b.tls_channel().await);
    let mut all = watcher
        .watch(WatchRequest { cursor: Some(0) })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(all.message().await.unwrap().unwrap());
    }
    let cursor_after_two = seen[1].cursor;
    // Three more while the watcher is connected.
    for t in &tasks[3..] {
        client
            .end_task(EndTaskRequest { task_id: t.clone() })
            .await
            .unwrap();
    }
    for _ in 0..3 {
        seen.push(
            tokio::time::timeout(Duration::from_secs(5), all.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    let order: Vec<String> = seen.iter().map(|e| e.task_id.clone()).collect();
    assert_eq!(order, tasks, "each event once, in order");
    assert!(seen.windows(2).all(|w| w[0].cursor < w[1].cursor));

    // A watcher that disconnected after the second event resumes without gaps or repeats.
    let mut resumed = watcher
        .watch(WatchRequest {
            cursor: Some(cursor_after_two),
        })
        .await
        .unwrap()
        .into_inner();
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(resumed.message().await.unwrap().unwrap().task_id);
    }
    assert_eq!(rest, tasks[2..]);
    // Nothing more is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), resumed.message())
            .await
            .is_err()
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watch_without_a_cursor_gets_every_event_committed_after_it_opened() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut watcher = RevocationsClient::new(b.unix_client_channel().await);
    // A history of 1,200 events, none of which a watch without a cursor replays (finding where
    // history ends must not hold the stream's start back past the call's return).
    let mut fill = Vec::new();
    for _ in 0..8 {
        let mut c = b.unix_client().await;
        fill.push(tokio::spawn(async move {
            for _ in 0..150 {
                let task_id = c
                    .begin_task(BeginTaskRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .task_id;
                c.end_task(EndTaskRequest { task_id }).await.unwrap();
            }
        }));
    }
    for f in fill {
        f.await.unwrap();
    }
    for round in 0..20 {
        let task_id = client
            .begin_task(BeginTaskRequest::default())
            .await
            .unwrap()
            .into_inner()
            .task_id;
        let mut stream = watcher
            .watch(WatchRequest { cursor: None })
            .await
            .unwrap()
            .into_inner();
        // Ended the moment the watch call returns: the watch must already count it as new.
        client
            .end_task(EndTaskRequest {
                task_id: task_id.clone(),
            })
            .await
            .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the event of a task ended after Watch returned")
            })
            .unwrap()
            .unwrap();
        assert_eq!(ev.task_id, task_id, "round {round}: only what came after");
    }
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_policy_reload_that_forbids_a_live_task_revokes_it() {
    // A grace longer than the time the test clock skips: only the policy may end a task here,
    // not the reaper.
    let b = start(&format!("{}\n[tasks]\ngrace = \"10m\"\n", uid_rule())).await;
    let mut client = b.unix_client().await;
    let keep = client
        .begin_task(BeginTaskRequest {
            labels: [("env".to_owned(), "dev".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let doomed = client
        .begin_task(BeginTaskRequest {
            labels: [("env".to_owned(), "prod".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            task_id: doomed.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = b.running.broker.bus().subscribe();
    // Time passes: re-evaluation decides each task as it was begun (same source, same evidence
    // age), so only the policy change itself can revoke it.
    b.clock.advance(Duration::from_secs(120));
    std::fs::write(
        policy_file(&b),
        r#"
@id("no-prod-tasks")
forbid (principal, action == Ephemera::Action::"BeginTask", resource)
when { context has task && context.task.labels.contains("env=prod") };
@id("fresh-local-evidence")
permit (principal, action == Ephemera::Action::"BeginTask", resource)
when { context.evidence_age_secs < 60 && !(context has source_ip) };
@id("minting")
permit (principal, action in [Ephemera::Action::"MintJwtSvid", Ephemera::Action::"MintX509Svid"], resource);
"#,
    )
    .unwrap();
    b.running.broker.policy().reload().unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    // One event for everything the reload revoked: the doomed task (with its credential).
    assert!(ev.is_set(), "{ev:?}");
    assert_eq!(ev.reason, "policy");
    let listed = b.running.broker.revoked_leases(&ev).await.unwrap();
    assert!(listed.iter().any(|l| l.id == jwt.jti), "{listed:?}");
    let ended = b
        .running
        .broker
        .store()
        .task(&doomed.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, ephemera::store::TaskState::Revoked);
    assert_eq!(introspect_http(&b, &jwt.token).await["active"], false);
    let kept = b
        .running
        .broker
        .store()
        .task(&keep.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.state, ephemera::store::TaskState::Active);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_ten_thousand_lease_task_is_revoked_with_one_write() {
    use ephemera::store::{Lease, LeaseKind};
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let store = b.running.broker.store();
    let now = b.clock.unix_now();
    // Leases recorded through the group-committing writer, concurrently.
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..10_000u32 {
        let broker = b.running.broker.clone();
        let lease = Lease {
            id: format!("{}-{i:05}", task.task_id),
            task_id: Some(task.task_id.clone()),
            kind: LeaseKind::Jwt,
            serial: None,
            spiffe_id: task.spiffe_id.clone(),
            principal: None,
            audience: vec!["a".into()],
            issued_at: now,
            expires_at: now + 600,
            revoked: false,
            revoked_at: None,
            reason: None,
            signing_key: None,
        };
        writers.spawn(async move { broker.store().insert_lease(lease).await });
    }
    while let Some(r) = writers.join_next().await {
        r.unwrap().unwrap();
    }
    let before = store.revocations_after(0, 1000).await.unwrap().len();
    client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap();
    let events = store.revocations_after(0, 1000).await.unwrap();
    assert_eq!(
        events.len(),
        before + 1,
        "one revocation record for the whole task"
    );
    let inactive = store
        .list_leases(
            ephemera::store::ListFilter {
                task_id: Some(task.task_id.clone()),
                state: Some("inactive".into()),
                limit: 20_000,
                ..Default::default()
            },
            b.clock.unix_now(),
        )
        .await
        .unwrap();
    assert_eq!(inactive.len(), 10_000);
    b.running.shutdown().await.unwrap();
}
