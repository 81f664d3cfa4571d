//! Hostile requests, refused before they reach the core, are audited like every decision: one
//! bounded event per refusal, with its reason code, and no caller-chosen string repeated whole;
//! so is a locked caller's refusal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, MintJwtSvidRequest, MintX509SvidRequest,
};
use ephemera::api::pb::workload::JwtsvidRequest;
use ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ephemera::client::ConnectOptions;

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn audit_events(lines: &Lines) -> Vec<serde_json::Value> {
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["target"] == "ephemera::audit")
        .collect()
}

#[tokio::test]
async fn every_refusal_before_the_core_is_one_bounded_audit_event() {
    let lines = Lines::default();
    let sink = lines.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("ephemera::audit=info")
            .with_writer(move || sink.clone())
            .finish(),
    )
    .unwrap();
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let long = "x".repeat(10 * 1024);

    let refusals: Vec<(&str, tonic::Code)> = vec![
        (
            "MintJwtSvid",
            client
                .mint_jwt_svid(MintJwtSvidRequest {
                    audience: vec!["db".into()],
                    ttl_seconds: Some(0),
                    ..MintJwtSvidRequest::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "MintJwtSvid",
            client
                .mint_jwt_svid(MintJwtSvidRequest::default())
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "MintJwtSvid",
            client
                .mint_jwt_svid(MintJwtSvidRequest {
                    audience: vec!["db".into()],
                    task_id: format!("../{long}"),
                    ..MintJwtSvidRequest::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "MintX509Svid",
            client
                .mint_x509_svid(MintX509SvidRequest {
                    csr: vec![0x30; 17 * 1024],
                    ..MintX509SvidRequest::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "BeginTask",
            client
                .begin_task(BeginTaskRequest {
                    labels: [(long.clone(), "v".to_owned())].into(),
                    ..BeginTaskRequest::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "EndTask",
            client
                .end_task(EndTaskRequest {
                    task_id: String::new(),
                })
                .await
                .unwrap_err()
                .code(),
        ),
    ];
    // The Workload API without its security header.
    let channel = ConnectOptions {
        socket: b.running.endpoints.workload_socket.clone(),
        ..ConnectOptions::default()
    }
    .connect()
    .await
    .unwrap();
    let workload = SpiffeWorkloadApiClient::new(channel)
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    let mut refusals = refusals;
    refusals.push(("FetchJWTSVID", workload.code()));

    for (action, code) in &refusals {
        assert!(
            matches!(
                code,
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            ),
            "{action}: {code:?}"
        );
    }
    let denials: Vec<serde_json::Value> = audit_events(&lines)
        .into_iter()
        .filter(|e| e["fields"]["decision"] == "deny")
        .collect();
    assert_eq!(
        denials.len(),
        refusals.len(),
        "one audit event per refusal: {denials:#?}"
    );
    for (event, (action, _)) in denials.iter().zip(&refusals) {
        assert_eq!(event["fields"]["action"], *action, "{event}");
        let code = event["fields"]["reason_code"].as_str().unwrap();
        assert!(
            code == "invalid_argument" || code == "csr.too_large",
            "{event}"
        );
        let text = event.to_string();
        assert!(
            text.len() < 2048,
            "an audit event is bounded: {} bytes",
            text.len()
        );
        assert!(
            !text.contains(&long[..100]),
            "the caller's long string is not repeated whole"
        );
    }

    // A locked caller's refusal is one audit event too, with its own reason code.
    b.running
        .broker
        .create_lock(
            ephemera::broker::trust::LockTarget::parse(&format!("claim:uid={}", my_uid())).unwrap(),
            "incident 9",
            None,
            "test",
        )
        .await
        .unwrap();
    let before = audit_events(&lines).len();
    let locked = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(locked.message(), "locked: incident 9");
    let events = audit_events(&lines);
    let new: Vec<_> = events[before..]
        .iter()
        .filter(|e| e["fields"]["decision"] == "deny")
        .collect();
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(new[0]["fields"]["reason_code"], "locked");
    assert_eq!(new[0]["fields"]["action"], "MintJwtSvid");
    b.running.shutdown().await.unwrap();
}
