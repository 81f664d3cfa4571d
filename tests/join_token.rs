//! Join tokens: created by an admin, stored hashed, single use, with a TTL; a denied request does
//! not burn one; the Admin API refuses callers without the admin token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::{CreateJoinTokenRequest, MintJwtSvidRequest, MintX509SvidRequest};
use ephemera::clock::Clock;
use tonic::{Code, Request};

const CONFIG: &str = r#"
[[mapping]]
attestor = "join_token"
spiffe_id = "spiffe://{trust_domain}/node/{claims.name}"
"#;

const POLICY: &str = r#"
@id("join-token-bootstrap")
permit (principal, action == Ephemera::Action::"MintX509Svid", resource)
when { principal.attestor == "join_token" && principal.hasTag("rack") && principal.getTag("rack") == "r7" };
"#;

fn admin<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn joining<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-ephemera-join-token", token.parse().unwrap());
    r
}

fn create(name: &str, ttl: u64) -> CreateJoinTokenRequest {
    CreateJoinTokenRequest {
        name: name.into(),
        ttl_seconds: Some(ttl),
        claims: HashMap::from([("rack".to_owned(), "r7".to_owned())]),
    }
}

#[tokio::test]
async fn single_use_hashed_expiring_and_admin_only() {
    let b = start_with_policy(CONFIG, POLICY).await;
    let mut admin_api = AdminClient::new(b.tls_channel().await);
    let token = admin_api
        .create_join_token(admin(create("build-box-7", 600), &b.admin_token()))
        .await
        .unwrap()
        .into_inner();
    assert!(token.token.starts_with("ejt_"));

    // Over TCP the join token is the only evidence.
    let mut broker = BrokerClient::new(b.tls_channel().await);
    // A denied request (policy permits only X.509 here) does not burn the token.
    let err = broker
        .mint_jwt_svid(joining(
            MintJwtSvidRequest {
                audience: vec!["a".into()],
                ..MintJwtSvidRequest::default()
            },
            &token.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let x = broker
        .mint_x509_svid(joining(MintX509SvidRequest::default(), &token.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(x.spiffe_id, format!("spiffe://{TD}/node/build-box-7"));
    verify_chain(&x.cert_chain, &x.bundle, b.clock.now());

    // Reused, expired, unknown: Unauthenticated with the reason.
    let expiring = admin_api
        .create_join_token(admin(create("build-box-8", 60), &b.admin_token()))
        .await
        .unwrap()
        .into_inner();
    b.clock.advance(Duration::from_secs(61));
    let rows = [
        ("reused", token.token.clone(), "already used"),
        ("expired", expiring.token.clone(), "expired"),
        ("unknown", format!("ejt_{}", "A".repeat(43)), "unknown"),
        ("not a join token", "hello".to_owned(), "unknown"),
    ];
    for (what, t, reason) in rows {
        let err = broker
            .mint_x509_svid(joining(MintX509SvidRequest::default(), &t))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(err.message().contains(reason), "{what}: {}", err.message());
    }

    // Stored hashed: the token text is nowhere in the database files.
    let mut db = Vec::new();
    for entry in std::fs::read_dir(b.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("ephemera.db")
        {
            db.extend(std::fs::read(p).unwrap());
        }
    }
    assert!(!db.is_empty());
    let needle = token.token.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle),
        "token stored in clear"
    );

    // The Admin API is deny by default.
    for bad in [None, Some("wrong-token-wrong-token-wrong-token")] {
        let req = match bad {
            None => Request::new(create("x", 60)),
            Some(t) => admin(create("x", 60), t),
        };
        let err = admin_api.create_join_token(req).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    // A workload's own evidence is not an admin credential.
    let mut over_socket = AdminClient::new(
        ephemera::client::ConnectOptions {
            socket: Some(b.socket()),
            ..Default::default()
        }
        .connect()
        .await
        .unwrap(),
    );
    let err = over_socket
        .create_join_token(Request::new(create("x", 60)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Bad admin input.
    for (what, req) in [
        (
            "bad name",
            CreateJoinTokenRequest {
                name: "a/b".into(),
                ..create("x", 60)
            },
        ),
        ("zero ttl", create("x", 0)),
        ("ttl over 7 days", create("x", 8 * 86_400)),
        (
            "reserved claim",
            CreateJoinTokenRequest {
                claims: HashMap::from([("name".to_owned(), "y".to_owned())]),
                ..create("x", 60)
            },
        ),
    ] {
        let err = admin_api
            .create_join_token(admin(req, &b.admin_token()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
    }
    b.running.shutdown().await.unwrap();
}
