//! `/metrics` after a scripted sequence shows exactly the expected counts. (Its own test binary:
//! the metrics recorder is process-wide.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use common::*;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, MintJwtSvidRequest, MintX509SvidRequest,
};

/// The value of the series named `name` carrying every `labels` pair (0 when absent).
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map_or(0.0, |(_, v)| v.parse().unwrap())
}

#[tokio::test]
async fn a_scripted_sequence_shows_exactly_the_expected_counts() {
    let policy = r#"
@id("short-jwts") permit (principal, action == Ephemera::Action::"MintJwtSvid", resource) when { context.requested_ttl_secs <= 600 };
@id("certs") permit (principal, action == Ephemera::Action::"MintX509Svid", resource);
@id("tasks") permit (principal, action == Ephemera::Action::"BeginTask", resource);
"#;
    let b = start_with_policy(&uid_rule(), policy).await;
    let mut client = b.unix_client().await;
    let jwt = |ttl| MintJwtSvidRequest {
        audience: vec!["a".into()],
        ttl_seconds: Some(ttl),
        ..Default::default()
    };
    client.mint_jwt_svid(jwt(60)).await.unwrap();
    client.mint_jwt_svid(jwt(120)).await.unwrap();
    client.mint_jwt_svid(jwt(3600)).await.unwrap_err();
    client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap();
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    client
        .end_task(EndTaskRequest {
            task_id: task.task_id,
        })
        .await
        .unwrap();

    let (status, scrape) = b.http_get("/metrics").await;
    assert_eq!(status, 200);
    type Labels<'a> = &'a [(&'a str, &'a str)];
    let rows: &[(&str, Labels<'_>, f64)] = &[
        ("ephemera_credentials_issued_total", &[("kind", "jwt")], 2.0),
        (
            "ephemera_credentials_issued_total",
            &[("kind", "x509")],
            1.0,
        ),
        (
            "ephemera_decisions_total",
            &[("action", "MintJwtSvid"), ("decision", "allow")],
            2.0,
        ),
        (
            "ephemera_decisions_total",
            &[("action", "MintJwtSvid"), ("decision", "deny")],
            1.0,
        ),
        (
            "ephemera_decisions_total",
            &[("action", "MintX509Svid"), ("decision", "allow")],
            1.0,
        ),
        (
            "ephemera_decisions_total",
            &[("action", "BeginTask"), ("decision", "allow")],
            1.0,
        ),
        (
            "ephemera_decisions_total",
            &[("action", "EndTask"), ("decision", "allow")],
            1.0,
        ),
        ("ephemera_revocations_total", &[("reason", "owner")], 1.0),
        ("ephemera_active_tasks", &[], 0.0),
        ("ephemera_active_leases", &[], 3.0),
        (
            "ephemera_mint_duration_seconds_count",
            &[("kind", "jwt")],
            3.0,
        ),
        (
            "ephemera_mint_duration_seconds_count",
            &[("kind", "x509")],
            1.0,
        ),
        ("ephemera_store_commit_duration_seconds_count", &[], 3.0),
    ];
    for (name, labels, want) in rows {
        assert_eq!(
            value(&scrape, name, labels),
            *want,
            "{name} {labels:?}\n{scrape}"
        );
    }
    let crl_bytes = value(&scrape, "ephemera_crl_bytes", &[]);
    assert!(
        crl_bytes > 100.0,
        "a signed CRL is served: {crl_bytes} bytes"
    );
    // Nothing identifying leaks into labels.
    assert!(!scrape.contains("spiffe://"), "{scrape}");
    b.running.shutdown().await.unwrap();
}
