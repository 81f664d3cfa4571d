//! Quotas through a real broker: over a limit the caller gets `RESOURCE_EXHAUSTED` naming the
//! limit, and nothing is issued; within limits nothing changes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use common::*;
use ephemera::api::pb::v1::{BeginTaskRequest, EndTaskRequest, MintJwtSvidRequest};
use tonic::Code;

fn jwt(task: &str) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        task_id: task.into(),
        ..MintJwtSvidRequest::default()
    }
}

#[tokio::test]
async fn task_and_lease_quotas() {
    let b = start(&format!(
        "{}\n[limits]\nmax_active_tasks_per_identity = 2\nmax_leases_per_task = 3\n",
        uid_rule()
    ))
    .await;
    let mut c = b.unix_client().await;
    let t1 = c
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    c.begin_task(BeginTaskRequest::default()).await.unwrap();
    let err = c.begin_task(BeginTaskRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("limits.max_active_tasks_per_identity (2)"),
        "{}",
        err.message()
    );

    for _ in 0..3 {
        c.mint_jwt_svid(jwt(&t1.task_id)).await.unwrap();
    }
    let err = c.mint_jwt_svid(jwt(&t1.task_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("limits.max_leases_per_task (3)"),
        "{}",
        err.message()
    );
    let leases = b
        .running
        .broker
        .store()
        .count_task_leases(&t1.task_id)
        .await
        .unwrap();
    assert_eq!(leases, 3, "nothing issued over the limit");
    // Standalone credentials are not bound by the per-task limit.
    c.mint_jwt_svid(jwt("")).await.unwrap();

    // Ending a task frees its slot.
    c.end_task(EndTaskRequest {
        task_id: t1.task_id,
    })
    .await
    .unwrap();
    c.begin_task(BeginTaskRequest::default()).await.unwrap();
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn request_rate_per_identity() {
    let b = start(&format!(
        "{}\n[limits]\nrequests_per_second = 2\nburst = 3\n",
        uid_rule()
    ))
    .await;
    let mut c = b.unix_client().await;
    let task = c
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        c.mint_jwt_svid(jwt("")).await.unwrap();
    }
    let err = c.mint_jwt_svid(jwt("")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("limits.requests_per_second (2/s per identity)"),
        "{}",
        err.message()
    );
    let err = c.begin_task(BeginTaskRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Ending a task is never refused for rate: it only lowers the load.
    c.end_task(EndTaskRequest {
        task_id: task.task_id.clone(),
    })
    .await
    .unwrap();
    let ended = b.running.broker.store().task(&task.task_id).await.unwrap();
    assert_ne!(ended.unwrap().state, ephemera::store::TaskState::Active);
    // The bucket refills at the configured rate.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    c.mint_jwt_svid(jwt("")).await.unwrap();
    b.running.shutdown().await.unwrap();
}
