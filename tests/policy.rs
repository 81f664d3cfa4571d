//! Cedar policy through a real broker: every request is decided at that moment, edits take
//! effect on the very next request, and a broken edit leaves the previous policies serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::{MintJwtSvidRequest, MintX509SvidRequest};
use tonic::Code;

fn jwt(ttl: Option<u64>) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        ttl_seconds: ttl,
        spiffe_id: String::new(),
        task_id: String::new(),
    }
}

const X509_ONLY: &str = r#"
@id("x509-only")
permit (principal, action == Ephemera::Action::"MintX509Svid", resource);
"#;

#[tokio::test]
async fn an_edit_that_removes_a_permission_fails_the_very_next_request() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    client.mint_jwt_svid(jwt(None)).await.unwrap();

    std::fs::write(policy_file(&b), X509_ONLY).unwrap();
    b.running.broker.policy().reload().unwrap();

    let err = client.mint_jwt_svid(jwt(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "denied by policy");
    client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .expect("still permitted");
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn file_changes_are_picked_up_without_a_signal() {
    let b = start(&uid_rule()).await;
    let mut reloads = b.running.broker.policy().subscribe();
    std::fs::write(policy_file(&b), X509_ONLY).unwrap();
    tokio::time::timeout(Duration::from_secs(10), reloads.changed())
        .await
        .expect("policy change noticed within 10s")
        .unwrap();
    let err = b
        .unix_client()
        .await
        .mint_jwt_svid(jwt(None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_broken_policy_is_reported_and_the_old_one_keeps_serving() {
    let b = start(&uid_rule()).await;
    std::fs::write(
        policy_file(&b),
        "permit (principal, action, resource) when { principal.no_such_attr };",
    )
    .unwrap();
    let problems = b.running.broker.policy().reload().unwrap_err();
    assert!(
        problems[0].to_string().contains("test.cedar:1"),
        "{problems:?}"
    );
    std::fs::write(policy_file(&b), "permit (principal,").unwrap();
    let problems = b.running.broker.policy().reload().unwrap_err();
    assert!(
        problems[0].to_string().contains("test.cedar"),
        "{problems:?}"
    );
    b.unix_client()
        .await
        .mint_jwt_svid(jwt(None))
        .await
        .expect("previous allow-all policy still serving");
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttl_above_the_policy_cap_is_denied() {
    let cap = r#"
@id("short-jwt")
permit (principal, action == Ephemera::Action::"MintJwtSvid", resource == Ephemera::Audience::"deploy")
when { principal.attestor == "unix" && context.requested_ttl_secs <= 600 && !(context has source_ip) };
"#;
    let b = start_with_policy(&uid_rule(), cap).await;
    let mut client = b.unix_client().await;
    client.mint_jwt_svid(jwt(Some(600))).await.unwrap();
    client
        .mint_jwt_svid(jwt(None))
        .await
        .expect("default ttl (5m) is under the cap");
    let err = client.mint_jwt_svid(jwt(Some(601))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["deploy".into(), "other".into()],
            ..jwt(None)
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "every audience must be permitted"
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_policies_means_deny() {
    let b = start_with_policy(&uid_rule(), "").await;
    let err = b
        .unix_client()
        .await
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mapping_reload_applies_good_edits_and_refuses_broken_ones() {
    use ephemera::app;
    use std::sync::Arc;
    let b = start(&uid_rule()).await;
    // A second broker on the same keys, started from a config *file* so it can be reloaded.
    let dir = tempfile::tempdir().unwrap();
    let data = b.dir.path();
    let cfg = dir.path().join("ephemera.toml");
    let text = |rules: &str| {
        config_text(data, &format!("[workload_api]\nenabled = false\n{rules}")).replace(
            &format!("socket = \"{}/broker.sock\"", data.display()),
            &format!("socket = \"{}/second.sock\"", dir.path().display()),
        )
    };
    std::fs::write(&cfg, text(&uid_rule())).unwrap();
    let config = ephemera::config::Config::load(&cfg).unwrap();
    let second = app::start(config, Arc::new(b.clock.clone())).await.unwrap();
    let mut client = ephemera::client::ConnectOptions {
        socket: Some(second.endpoints.broker_socket.clone()),
        ..Default::default()
    }
    .broker()
    .await
    .unwrap();
    client.mint_jwt_svid(jwt(None)).await.unwrap();

    // Someone else's uid only: this process loses its identity on the next request.
    let other = format!(
        "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{{trust_domain}}/uid/{{claims.uid}}\"\nmatch = {{ uid = {} }}\n",
        my_uid() + 1
    );
    std::fs::write(&cfg, text(&other)).unwrap();
    assert_eq!(app::reload_mappings(&second.broker, &cfg), Ok(1));
    let err = client.mint_jwt_svid(jwt(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "no identity mapping: no mapping rule gives an identity to this caller, attested by `unix`"
    );

    // A broken file is refused and the rules in force keep serving.
    std::fs::write(
        &cfg,
        text(&uid_rule()).replace("{claims.uid}", "{claims.uid"),
    )
    .unwrap();
    assert!(app::reload_mappings(&second.broker, &cfg).is_err());
    let err = client.mint_jwt_svid(jwt(None)).await.unwrap_err();
    assert_eq!(
        err.message(),
        "no identity mapping: no mapping rule gives an identity to this caller, attested by `unix`",
        "previous rules still in force"
    );
    second.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
}

/// Policy narrows on behaviour: an identity that already got three credentials in the last
/// minute is refused a fourth, one with two live tasks may not begin a third, and its denials
/// are counted too.
#[tokio::test]
async fn policy_sees_recent_behaviour() {
    let policy = r#"
@id("allow-all")
permit (principal, action, resource);

@id("burst")
forbid (principal, action == Ephemera::Action::"MintJwtSvid", resource)
when { context has behaviour && context.behaviour.issued_last_minute >= 3 };

@id("too-many-tasks")
forbid (principal, action == Ephemera::Action::"BeginTask", resource)
when { context has behaviour && context.behaviour.live_tasks >= 2 };

@id("after-denials")
forbid (principal, action == Ephemera::Action::"MintX509Svid", resource)
when { context has behaviour && context.behaviour.denials_last_10_minutes >= 2 };
"#;
    let b = start_with_policy(&uid_rule(), policy).await;
    let mut client = b.unix_client().await;
    for _ in 0..3 {
        client.mint_jwt_svid(jwt(None)).await.unwrap();
    }
    for _ in 0..2 {
        let err = client.mint_jwt_svid(jwt(None)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    // Two denials in the last ten minutes: X.509 is refused too now.
    let err = client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    use ephemera::api::pb::v1::BeginTaskRequest;
    for _ in 0..2 {
        client
            .begin_task(BeginTaskRequest::default())
            .await
            .unwrap();
    }
    let err = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A minute later (on the broker's clock) issuance is back under the limit.
    b.clock.advance(Duration::from_secs(70));
    let still = client.mint_jwt_svid(jwt(None)).await;
    assert!(still.is_ok(), "{still:?}");
    b.running.shutdown().await.unwrap();
}
