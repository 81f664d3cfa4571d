//! Trust is never carried forward: a policy edit revokes the live standalone credentials it no
//! longer permits (introspection, watch, CRL), and a lock stops an identity at once — new mints
//! refused with "locked: <reason>", live credentials and tasks revoked — until it is deleted or
//! expires.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, CreateLockRequest, DeleteLockRequest, ListLocksRequest, MintJwtSvidRequest,
    MintX509SvidRequest, ReloadPolicyRequest, WatchRequest,
};
use ephemera::clock::Clock;
use ephemera::store::TaskState;
use tonic::{Code, Request};

fn admin<T>(b: &TestBroker, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", b.admin_token()).parse().unwrap(),
    );
    r
}

fn jwt(aud: &str) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec![aud.into()],
        ttl_seconds: Some(600),
        ..MintJwtSvidRequest::default()
    }
}

#[tokio::test]
async fn a_policy_edit_revokes_the_live_standalone_credentials_it_no_longer_permits() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let kept = client
        .mint_jwt_svid(jwt("billing"))
        .await
        .unwrap()
        .into_inner();
    let doomed: Vec<_> = mint_several(&mut client, "deploy", 3).await;
    let x509 = client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut watch = RevocationsClient::new(b.unix_client_channel().await)
        .watch(WatchRequest { cursor: None })
        .await
        .unwrap()
        .into_inner();

    std::fs::write(
        policy_file(&b),
        r#"
@id("allow-all")
permit (principal, action, resource);
@id("no-deploy")
forbid (principal, action == Ephemera::Action::"MintJwtSvid", resource == Ephemera::Audience::"deploy");
@id("no-certificates")
forbid (principal, action == Ephemera::Action::"MintX509Svid", resource);
"#,
    )
    .unwrap();
    let r = AdminClient::new(b.tls_channel().await)
        .reload_policy(admin(&b, ReloadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.policies, 3);
    // The file watch may have reloaded the edit first (it polls every 100 ms); whoever decided
    // first revoked the four credentials in one event, and the other found only the kept one.
    let (decided, grants, revoked) = (
        r.credentials_decided,
        r.grants_decided,
        r.credentials_revoked,
    );
    assert!(
        (decided, grants, revoked) == (5, 3, 4) || (decided, grants, revoked) == (1, 1, 0),
        "{r:?}"
    );

    // One event, reason "policy", listing every revoked credential.
    let event = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.reason, "policy");
    if revoked > 0 {
        assert_eq!(event.cursor, r.cursor);
    }
    let mut listed: Vec<String> = event
        .credentials
        .iter()
        .map(|c| c.lease_id.clone())
        .collect();
    listed.sort();
    let mut want: Vec<String> = doomed.iter().map(|t| t.jti.clone()).collect();
    want.push(x509.lease_id.clone());
    want.sort();
    assert_eq!(listed, want);

    for t in &doomed {
        assert_eq!(introspect_http(&b, &t.token).await["active"], false);
    }
    assert_eq!(introspect_http(&b, &kept.token).await["active"], true);
    let crl = crl_listing(&b, &x509.serial).await;
    let checked = check_with_crl(&x509.cert_chain, &x509.bundle, &crl, b.clock.now());
    assert!(
        matches!(checked, Err(webpki::Error::CertRevoked)),
        "{checked:?}"
    );
    // And minting for the audience is refused from now on.
    let refused = client.mint_jwt_svid(jwt("deploy")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Reloading the same policies again decides again and revokes nothing more.
    let again = AdminClient::new(b.tls_channel().await)
        .reload_policy(admin(&b, ReloadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            again.credentials_decided,
            again.credentials_revoked,
            again.cursor
        ),
        (1, 0, 0)
    );
    b.running.shutdown().await.unwrap();
}

async fn mint_several(
    client: &mut ephemera::api::pb::v1::broker_client::BrokerClient<tonic::transport::Channel>,
    aud: &str,
    n: usize,
) -> Vec<ephemera::api::pb::v1::MintJwtSvidResponse> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.mint_jwt_svid(jwt(aud)).await.unwrap().into_inner());
    }
    out
}

#[tokio::test]
async fn a_lock_on_a_claim_stops_the_identity_at_once_until_deleted() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut api = AdminClient::new(b.tls_channel().await);
    let token = client
        .mint_jwt_svid(jwt("deploy"))
        .await
        .unwrap()
        .into_inner();
    let x509 = client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner();
    let in_task = client
        .mint_jwt_svid(MintJwtSvidRequest {
            task_id: task.task_id.clone(),
            ..jwt("deploy")
        })
        .await
        .unwrap()
        .into_inner();

    // A lock that matches nothing revokes nothing, but is recorded (and announced).
    let other = api
        .create_lock(admin(
            &b,
            CreateLockRequest {
                target: "claim:uid=4000000000".into(),
                reason: "someone else".into(),
                ttl_seconds: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((other.task_ids.len(), other.credentials_revoked), (0, 0));
    assert!(other.cursor > 0);
    client.mint_jwt_svid(jwt("deploy")).await.unwrap();

    let lock = api
        .create_lock(admin(
            &b,
            CreateLockRequest {
                target: format!("claim:uid={}", my_uid()),
                reason: "incident 42".into(),
                ttl_seconds: Some(3600),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lock.task_ids, std::slice::from_ref(&task.task_id));
    assert_eq!(
        lock.credentials_revoked, 4,
        "two standalone JWT-SVIDs, one X.509-SVID, one in the task"
    );
    let info = lock.lock.unwrap();
    assert_eq!(info.target, format!("claim:uid={}", my_uid()));
    assert!(info.active);

    // Everything it held is revoked at once...
    for t in [&token.token, &in_task.token] {
        assert_eq!(introspect_http(&b, t).await["active"], false);
    }
    crl_listing(&b, &x509.serial).await;
    let stored = b
        .running
        .broker
        .store()
        .task(&task.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, TaskState::Revoked);
    assert_eq!(stored.reason.as_deref(), Some("locked: incident 42"));
    // ...and nothing new is issued, whatever is asked.
    for refused in [
        client.mint_jwt_svid(jwt("deploy")).await.unwrap_err(),
        client
            .mint_x509_svid(MintX509SvidRequest::default())
            .await
            .unwrap_err(),
        client
            .begin_task(BeginTaskRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert_eq!(refused.message(), "locked: incident 42");
    }

    let listed = api
        .list_locks(admin(&b, ListLocksRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.locks.len(), 2);
    assert_eq!(listed.locks[0].id, info.id, "newest first");
    assert_eq!(listed.locks[0].reason, "incident 42");

    // A lock survives a restart of its reader: a fresh read from the store finds it.
    b.running.broker.refresh_locks().await.unwrap();
    assert_eq!(
        client
            .mint_jwt_svid(jwt("deploy"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Deleted: the identity can be issued to again; what was revoked stays revoked.
    let deleted = api
        .delete_lock(admin(
            &b,
            DeleteLockRequest {
                id: info.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    let again = api
        .delete_lock(admin(
            &b,
            DeleteLockRequest {
                id: info.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);
    client.mint_jwt_svid(jwt("deploy")).await.unwrap();
    assert_eq!(introspect_http(&b, &token.token).await["active"], false);

    // A lock with an expiry stops matching when it expires.
    api.create_lock(admin(
        &b,
        CreateLockRequest {
            target: "spiffe_id=spiffe://example.org/*".into(),
            reason: "maintenance".into(),
            ttl_seconds: Some(60),
        },
    ))
    .await
    .unwrap();
    let refused = client.mint_jwt_svid(jwt("deploy")).await.unwrap_err();
    assert_eq!(refused.message(), "locked: maintenance");
    b.clock.advance(Duration::from_secs(61));
    client.mint_jwt_svid(jwt("deploy")).await.unwrap();
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn locks_refuse_bad_requests_clearly() {
    let b = start(&uid_rule()).await;
    let mut api = AdminClient::new(b.tls_channel().await);
    for (target, reason, says) in [
        ("uid=1", "r", "unknown lock target"),
        ("claim:uid=1", "", "a reason is required"),
        ("claim:uid=1", &"x".repeat(300), "a reason is required"),
        ("spiffe_id=https://x", "r", "spiffe_id"),
        ("cidr=10.0.0.0/40", "r", "0 to 32"),
        (&format!("subject={}", "a".repeat(5000)), "r", "over 2048"),
    ] {
        let err = api
            .create_lock(admin(
                &b,
                CreateLockRequest {
                    target: target.into(),
                    reason: reason.into(),
                    ttl_seconds: None,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{target}");
        assert!(err.message().contains(says), "{target}: {}", err.message());
        assert!(
            err.message().len() < 400,
            "bounded: {}",
            err.message().len()
        );
    }
    let unauthenticated = api
        .create_lock(CreateLockRequest {
            target: "claim:uid=1".into(),
            reason: "r".into(),
            ttl_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::PermissionDenied);
    assert!(
        api.list_locks(admin(&b, ListLocksRequest {}))
            .await
            .unwrap()
            .into_inner()
            .locks
            .is_empty()
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_credential_committed_just_after_a_lock_is_swept_again() {
    use ephemera::store::{Lease, LeaseKind};
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let before = client
        .mint_jwt_svid(jwt("deploy"))
        .await
        .unwrap()
        .into_inner();
    let store = b.running.broker.store();
    let principal = store
        .lease(&before.jti)
        .await
        .unwrap()
        .unwrap()
        .lease
        .principal
        .expect("a lease names its principal");
    b.running
        .broker
        .create_lock(
            ephemera::broker::trust::LockTarget::parse(&format!("claim:uid={}", my_uid())).unwrap(),
            "incident 51",
            None,
            "test",
        )
        .await
        .unwrap();
    // A mint that passed the lock check just before the lock, committing after the sweep.
    let now = b.clock.unix_now();
    store
        .insert_lease(Lease {
            id: "racing-lease".into(),
            task_id: None,
            kind: LeaseKind::Jwt,
            serial: None,
            spiffe_id: format!("spiffe://{TD}/uid/{}", my_uid()),
            principal: Some(principal),
            audience: vec!["deploy".into()],
            issued_at: now,
            expires_at: now + 600,
            revoked: false,
            revoked_at: None,
            reason: None,
            signing_key: None,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = store.lease("racing-lease").await.unwrap().unwrap();
        if l.lease.revoked {
            assert_eq!(l.lease.reason.as_deref(), Some("locked: incident 51"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second sweep did not revoke it within 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.running.shutdown().await.unwrap();
}
