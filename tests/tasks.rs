//! Tasks through a real broker: credentials bound to a task end with it — by EndTask, by a lost
//! keep-alive after the grace, by the deadline — and only the task's owner may use it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, KeepAliveRequest, MintJwtSvidRequest, MintX509SvidRequest,
};
use ephemera::clock::Clock;
use ephemera::store::TaskState;
use tonic::Code;

fn jwt_in(task: &str) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        ttl_seconds: Some(3600),
        spiffe_id: String::new(),
        task_id: task.into(),
    }
}

/// Waits (bounded) until the task is no longer active in the store.
async fn wait_ended(b: &TestBroker, task: &str) -> ephemera::store::Task {
    let mut events = b.running.broker.bus().subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = b.running.broker.store().task(task).await.unwrap().unwrap();
        if t.state != TaskState::Active {
            return t;
        }
        tokio::select! {
            _ = events.recv() => {}
            _ = tokio::time::sleep_until(deadline) => panic!("task {task} still active"),
        }
    }
}

#[tokio::test]
async fn credentials_die_with_their_task() {
    let b = start(&format!(
        "{}\n[tasks]\nheartbeat_interval = \"5s\"\ngrace = \"10s\"\n",
        uid_rule()
    ))
    .await;
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest {
            max_duration_seconds: Some(600),
            labels: [("job".to_owned(), "deploy-42".to_owned())].into(),
            spiffe_id: String::new(),
            scopes: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let now = b.clock.unix_now();
    assert_eq!(task.deadline, now + 600);
    assert_eq!(task.heartbeat_interval_seconds, 5);
    assert_eq!(task.grace_seconds, 10);

    // A credential of the task ends no later than the task's deadline.
    let jwt = client
        .mint_jwt_svid(jwt_in(&task.task_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.expires_at, task.deadline, "capped at the task deadline");
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let store = b.running.broker.store();
    let now = b.clock.unix_now();
    assert!(store.lease(&jwt.jti).await.unwrap().unwrap().active(now));
    let by_serial = store.lease(&x.serial).await.unwrap().unwrap();
    assert_eq!(by_serial.lease.id, x.lease_id);
    assert_eq!(
        by_serial.lease.task_id.as_deref(),
        Some(task.task_id.as_str())
    );

    let ended = client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ended.state.as_str(), ended.already_ended),
        ("ended", false)
    );
    assert!(!store.lease(&jwt.jti).await.unwrap().unwrap().active(now));
    assert!(!store.lease(&x.lease_id).await.unwrap().unwrap().active(now));

    // Ending again is idempotent and says so; minting into it fails.
    let again = client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_ended);
    let err = client
        .mint_jwt_svid(jwt_in(&task.task_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // A keep-alive for an ended task is refused.
    let err = client
        .keep_alive(tokio_stream::iter(vec![KeepAliveRequest {
            task_id: task.task_id.clone(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // Unknown and malformed task ids.
    let err = client
        .mint_jwt_svid(jwt_in("0195a1b2-0000-7000-8000-000000000000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.mint_jwt_svid(jwt_in("../etc")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_the_owner_may_use_a_task() {
    let b = start(&uid_rule()).await;
    let mut mine = b.unix_client().await;
    let task = mine
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Another identity (a join-token holder) tries to mint into it and end it.
    let mut admin_api =
        ephemera::api::pb::v1::admin_client::AdminClient::new(b.tls_channel().await);
    let mut req = tonic::Request::new(ephemera::api::pb::v1::CreateJoinTokenRequest {
        name: "intruder".into(),
        ttl_seconds: Some(600),
        claims: Default::default(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", b.admin_token()).parse().unwrap(),
    );
    let jt = admin_api
        .create_join_token(req)
        .await
        .unwrap()
        .into_inner()
        .token;
    b.running.broker.set_mapper(ephemera::policy::Mapper::new(
        TD.parse().unwrap(),
        ephemera::config::Config::from_toml(
            &config_text(b.dir.path(), &format!("{}\n[[mapping]]\nattestor = \"join_token\"\nspiffe_id = \"spiffe://{{trust_domain}}/node/{{claims.name}}\"\n", uid_rule())),
            std::path::Path::new("/"),
        )
        .unwrap()
        .mappings,
    ));
    let mut other = ephemera::api::pb::v1::broker_client::BrokerClient::new(b.tls_channel().await);
    let mut req = tonic::Request::new(jwt_in(&task.task_id));
    req.metadata_mut()
        .insert("x-ephemera-join-token", jt.parse().unwrap());
    let err = other.mint_jwt_svid(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let mut req = tonic::Request::new(EndTaskRequest {
        task_id: task.task_id.clone(),
    });
    req.metadata_mut()
        .insert("x-ephemera-join-token", jt.parse().unwrap());
    assert_eq!(
        other.end_task(req).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // The owner's task is untouched.
    mine.mint_jwt_svid(jwt_in(&task.task_id)).await.unwrap();
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn dropped_keep_alive_ends_the_task_after_the_grace() {
    let b = start(&format!(
        "{}\n[tasks]\nheartbeat_interval = \"5s\"\ngrace = \"10s\"\n",
        uid_rule()
    ))
    .await;
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let jwt = client
        .mint_jwt_svid(jwt_in(&task.task_id))
        .await
        .unwrap()
        .into_inner();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(KeepAliveRequest {
        task_id: task.task_id.clone(),
    })
    .await
    .unwrap();
    let mut replies = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        replies.message().await.unwrap().unwrap().deadline,
        task.deadline
    );
    // Pings keep it alive across what would otherwise be the grace.
    for _ in 0..3 {
        b.clock.advance(Duration::from_secs(5));
        tx.send(KeepAliveRequest::default()).await.unwrap();
        replies.message().await.unwrap().unwrap();
    }
    ephemera::lease::reap_once(b.running.broker.store(), b.running.broker.bus(), &b.clock).await;
    let t = b
        .running
        .broker
        .store()
        .task(&task.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.state, TaskState::Active);

    // The client goes away: within the grace the task lives (it may reconnect), after it, not.
    drop(tx);
    drop(replies);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = b
            .running
            .broker
            .store()
            .task(&task.task_id)
            .await
            .unwrap()
            .unwrap();
        if t.due_at <= b.clock.unix_now() + t.grace_secs {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream end not recorded"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.clock.advance(Duration::from_secs(5));
    assert_eq!(
        ephemera::lease::reap_once(b.running.broker.store(), b.running.broker.bus(), &b.clock)
            .await,
        0,
        "still within the grace"
    );
    b.clock.advance(Duration::from_secs(6));
    let t = wait_ended(&b, &task.task_id).await;
    assert_eq!(t.state, TaskState::Expired);
    assert_eq!(t.reason.as_deref(), Some("keep-alive lost"));
    let now = b.clock.unix_now();
    assert!(
        !b.running
            .broker
            .store()
            .lease(&jwt.jti)
            .await
            .unwrap()
            .unwrap()
            .active(now)
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_deadline_ends_a_task_even_when_kept_alive() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest {
            max_duration_seconds: Some(20),
            ..Default::default()
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
    let mut replies = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    b.clock.advance(Duration::from_secs(21));
    let t = wait_ended(&b, &task.task_id).await;
    assert_eq!(t.reason.as_deref(), Some("deadline passed"));
    // The open keep-alive stream is told.
    let end = replies.message().await.unwrap_err();
    assert_eq!(end.code(), Code::FailedPrecondition);
    drop(tx);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn policy_decides_on_a_tasks_declared_scopes_at_begin_and_after_a_reload() {
    let b = start_with_policy(
        &uid_rule(),
        r#"
@id("read-tasks")
permit (principal, action == Ephemera::Action::"BeginTask", resource)
when { context has task && context.task.scopes.contains("tickets:read") };
@id("no-writes")
forbid (principal, action, resource)
when { context has task && context.task.scopes.contains("tickets:write") };
@id("minting")
permit (principal, action in [Ephemera::Action::"MintJwtSvid", Ephemera::Action::"MintX509Svid"], resource);
"#,
    )
    .await;
    let mut client = b.unix_client().await;
    let begin = |scopes: &[&str]| BeginTaskRequest {
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..BeginTaskRequest::default()
    };
    // Policy sees the intent when the task begins.
    let denied = client
        .begin_task(begin(&["tickets:read", "tickets:write"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let denied = client.begin_task(begin(&[])).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let task = client
        .begin_task(begin(&["tickets:read", "deploy:staging", "tickets:read"]))
        .await
        .unwrap()
        .into_inner();
    let stored = b
        .running
        .broker
        .store()
        .task(&task.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.scopes,
        ["deploy:staging", "tickets:read"],
        "sorted, unique"
    );
    // Malformed scopes are refused before the core.
    for bad in ["", "has space", "quote\"", &"x".repeat(129)] {
        let err = client.begin_task(begin(&[bad])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(err.message().contains("scope"), "{}", err.message());
    }
    // And again after a reload: a policy that forbids the intent ends the task.
    std::fs::write(
        policy_file(&b),
        r#"
@id("no-staging-deploys")
forbid (principal, action, resource)
when { context has task && context.task.scopes.contains("deploy:staging") };
@id("all")
permit (principal, action, resource);
"#,
    )
    .unwrap();
    // Reloaded by the admin call or the file watch, whichever comes first: either way the
    // task is revoked by the time the reload has been decided.
    b.running.broker.policy().reload().unwrap();
    b.running.broker.redecide_policy().await.unwrap();
    let ended = b
        .running
        .broker
        .store()
        .task(&task.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, TaskState::Revoked);
    assert_eq!(ended.reason.as_deref(), Some("policy"));
    b.running.shutdown().await.unwrap();
}
