//! The Admin API: listing with filters and tamper-evident paging, revocation of a lease, a task
//! or an identity (idempotent, and saying so), policy reload; and a restart that keeps live
//! tasks and ends overdue ones.
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
use ephemera::api::pb::v1::{
    BeginTaskRequest, GetLeaseRequest, ListLeasesRequest, ListTasksRequest, MintJwtSvidRequest,
    MintX509SvidRequest, ReloadPolicyRequest, RevokeIdentityRequest, RevokeLeaseRequest,
    RevokeTaskRequest,
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

#[tokio::test]
async fn list_get_and_revoke() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut api = AdminClient::new(b.tls_channel().await);
    let mut task_ids = Vec::new();
    for _ in 0..5 {
        task_ids.push(
            client
                .begin_task(BeginTaskRequest::default())
                .await
                .unwrap()
                .into_inner()
                .task_id,
        );
    }
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task_ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Paging: 2 + 2 + 1, newest first, tokens chained.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = api
            .list_tasks(admin(
                &b,
                ListTasksRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.tasks.into_iter().map(|t| t.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let newest_first: Vec<String> = task_ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);
    // A tampered page token is refused, not silently honoured.
    let page = api
        .list_tasks(admin(
            &b,
            ListTasksRequest {
                page_size: 2,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut bad = page.next_page_token.clone();
    bad.replace_range(0..1, if bad.starts_with('A') { "B" } else { "A" });
    for t in [
        bad,
        "garbage".to_owned(),
        format!("{}x", page.next_page_token),
    ] {
        let err = api
            .list_tasks(admin(
                &b,
                ListTasksRequest {
                    page_token: t,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    // Lease filters and lookup by serial.
    let of_task = api
        .list_leases(admin(
            &b,
            ListLeasesRequest {
                task_id: task_ids[0].clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(of_task.len(), 1);
    assert_eq!(of_task[0].serial, x.serial);
    let got = api
        .get_lease(admin(
            &b,
            GetLeaseRequest {
                id: x.serial.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.id.as_str(), got.active, got.state.as_str()),
        (x.lease_id.as_str(), true, "active")
    );

    // Revoke a lease: inactive; again: idempotent, says so.
    let r = api
        .revoke_lease(admin(
            &b,
            RevokeLeaseRequest {
                id: jwt.jti.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.already_revoked);
    let r = api
        .revoke_lease(admin(
            &b,
            RevokeLeaseRequest {
                id: jwt.jti.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.already_revoked);
    let got = api
        .get_lease(admin(
            &b,
            GetLeaseRequest {
                id: jwt.jti.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.active, got.state.as_str()), (false, "revoked"));

    // Revoke a task: its certificate's lease reports the task's end.
    api.revoke_task(admin(
        &b,
        RevokeTaskRequest {
            task_id: task_ids[0].clone(),
        },
    ))
    .await
    .unwrap();
    let got = api
        .get_lease(admin(
            &b,
            GetLeaseRequest {
                id: x.lease_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.active, got.state.as_str()), (false, "task_revoked"));
    let inactive = api
        .list_leases(admin(
            &b,
            ListLeasesRequest {
                state: "inactive".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(inactive.len(), 2);

    // Revoke an identity: every remaining active task of it.
    let me = format!("spiffe://{TD}/uid/{}", my_uid());
    let r = api
        .revoke_identity(admin(
            &b,
            RevokeIdentityRequest {
                spiffe_id: me.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.task_ids, task_ids[1..]);
    let active = api
        .list_tasks(admin(
            &b,
            ListTasksRequest {
                state: "active".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(active.is_empty());

    // Bad input: exact codes.
    let rows: Vec<(&str, Code, tonic::Status)> = vec![
        (
            "unknown task",
            Code::NotFound,
            api.revoke_task(admin(
                &b,
                RevokeTaskRequest {
                    task_id: "0195a1b2-0000-7000-8000-000000000000".into(),
                },
            ))
            .await
            .unwrap_err(),
        ),
        (
            "unknown lease",
            Code::NotFound,
            api.get_lease(admin(&b, GetLeaseRequest { id: "nope".into() }))
                .await
                .unwrap_err(),
        ),
        (
            "bad state filter",
            Code::InvalidArgument,
            api.list_tasks(admin(
                &b,
                ListTasksRequest {
                    state: "zombie".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
        ),
        (
            "bad spiffe id",
            Code::InvalidArgument,
            api.revoke_identity(admin(
                &b,
                RevokeIdentityRequest {
                    spiffe_id: "spiffe://x/../y".into(),
                },
            ))
            .await
            .unwrap_err(),
        ),
        (
            "page too large",
            Code::InvalidArgument,
            api.list_leases(admin(
                &b,
                ListLeasesRequest {
                    page_size: 5000,
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err(),
        ),
        (
            "no admin credential",
            Code::PermissionDenied,
            api.list_tasks(Request::new(ListTasksRequest::default()))
                .await
                .unwrap_err(),
        ),
    ];
    for (what, code, err) in rows {
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }

    // Policy reload: a broken file is refused with its problems, the old policy keeps serving.
    std::fs::write(policy_file(&b), "permit (principal,").unwrap();
    let err = api
        .reload_policy(admin(&b, ReloadPolicyRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("test.cedar"), "{}", err.message());
    client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            ..Default::default()
        })
        .await
        .expect("old policy still serving");
    std::fs::write(policy_file(&b), ALLOW_ALL).unwrap();
    let r = api
        .reload_policy(admin(&b, ReloadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.policies, 1);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_keeps_live_tasks_and_ends_overdue_ones() {
    let extra = format!(
        "{}\n[tasks]\nheartbeat_interval = \"5s\"\ngrace = \"10s\"\n",
        uid_rule()
    );
    let b = start(&extra).await;
    let mut client = b.unix_client().await;
    let short = client
        .begin_task(BeginTaskRequest {
            max_duration_seconds: Some(30),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let long = client
        .begin_task(BeginTaskRequest {
            max_duration_seconds: Some(3600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dir = b.dir;
    let clock = b.clock.clone();
    b.running.shutdown().await.unwrap();

    // Down for a minute: the short task's deadline passed, and nobody kept anything alive.
    clock.advance(Duration::from_secs(60));
    let config = ephemera::config::Config::from_toml(
        &config_text(dir.path(), &extra),
        std::path::Path::new("/"),
    )
    .unwrap();
    let running = ephemera::app::start(config, std::sync::Arc::new(clock.clone()))
        .await
        .unwrap();
    // Subscribe before looking, so an end between the look and the wait is not missed.
    let mut events = running.broker.bus().subscribe();
    let store = running.broker.store();
    // Live task: a fresh grace to reconnect.
    let t = store.task(&long.task_id).await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Active);
    assert_eq!(t.due_at, clock.unix_now() + 15);
    // Overdue task: ended by the first reaper pass.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let t = store.task(&short.task_id).await.unwrap().unwrap();
        if t.state != TaskState::Active {
            assert_eq!(t.reason.as_deref(), Some("deadline passed"));
            break;
        }
        tokio::select! {
            _ = events.recv() => {}
            _ = tokio::time::sleep_until(deadline) => panic!("overdue task not ended after restart"),
        }
    }
    assert_eq!(
        store.task(&long.task_id).await.unwrap().unwrap().state,
        TaskState::Active
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admins_may_use_an_svid_of_this_broker_over_mtls() {
    let extra = format!(
        "{}\n[admin]\nspiffe_ids = [\"spiffe://{TD}/admin/alice\"]\n\n[[mapping]]\nattestor = \"join_token\"\nspiffe_id = \"spiffe://{{trust_domain}}/admin/{{claims.name}}\"\n",
        uid_rule()
    );
    let b = start(&extra).await;
    // Alice bootstraps an admin SVID with a join token; a workload gets an ordinary one.
    let mut api = AdminClient::new(b.tls_channel().await);
    let jt = api
        .create_join_token(admin(
            &b,
            ephemera::api::pb::v1::CreateJoinTokenRequest {
                name: "alice".into(),
                ttl_seconds: Some(60),
                claims: Default::default(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut broker = ephemera::api::pb::v1::broker_client::BrokerClient::new(b.tls_channel().await);
    let mut req = Request::new(MintX509SvidRequest::default());
    req.metadata_mut()
        .insert("x-ephemera-join-token", jt.parse().unwrap());
    let alice = broker.mint_x509_svid(req).await.unwrap().into_inner();
    assert_eq!(alice.spiffe_id, format!("spiffe://{TD}/admin/alice"));
    let workload = b
        .unix_client()
        .await
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();

    let connect = |svid: &ephemera::api::pb::v1::MintX509SvidResponse| {
        let chain: String = svid
            .cert_chain
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
            .collect();
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.private_key.clone()));
        let bundle = std::fs::read(&b.running.endpoints.ca_bundle).unwrap();
        tonic::transport::Endpoint::from_shared(b.running.endpoints.grpc_addr.clone())
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(bundle))
                    .identity(tonic::transport::Identity::from_pem(chain, key)),
            )
            .unwrap()
    };
    let mut as_alice = AdminClient::new(connect(&alice).connect().await.unwrap());
    as_alice
        .list_tasks(Request::new(ListTasksRequest::default()))
        .await
        .expect("an admin SVID is an admin credential");
    let mut as_workload = AdminClient::new(connect(&workload).connect().await.unwrap());
    let err = as_workload
        .list_tasks(Request::new(ListTasksRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "a workload SVID is not");
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn revoking_an_identity_revokes_everything_it_holds_in_one_event() {
    use ephemera::api::pb::v1::WatchRequest;
    use ephemera::api::pb::v1::revocations_client::RevocationsClient;
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let mut api = AdminClient::new(b.tls_channel().await);
    let mut watch = RevocationsClient::new(b.unix_client_channel().await)
        .watch(WatchRequest { cursor: None })
        .await
        .unwrap()
        .into_inner();
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let in_task = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["db".into()],
            task_id: task.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Standalone credentials: no task holds them.
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["db".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let x509 = client
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();

    let me = format!("spiffe://{TD}/uid/{}", my_uid());
    let r = api
        .revoke_identity(admin(
            &b,
            RevokeIdentityRequest {
                spiffe_id: me.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.already_revoked);
    assert_eq!(r.task_ids, std::slice::from_ref(&task));
    assert_eq!(
        r.credentials_revoked, 3,
        "the task's token and both standalone ones"
    );

    // One event, listing every credential, with the identity.
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.cursor, r.cursor);
    assert_eq!(ev.spiffe_id, me);
    let mut jtis: Vec<&str> = ev.credentials.iter().map(|c| c.jti.as_str()).collect();
    jtis.retain(|j| !j.is_empty());
    jtis.sort_unstable();
    let mut want = [in_task.jti.as_str(), jwt.jti.as_str()];
    want.sort_unstable();
    assert_eq!(jtis, want);
    assert!(ev.credentials.iter().any(|c| c.serial == x509.serial));

    // Zero live credentials: introspection, the CRL and the task all say so.
    for token in [&jwt.token, &in_task.token] {
        assert_eq!(introspect_http(&b, token).await["active"], false);
    }
    crl_listing(&b, &x509.serial).await;
    let tasks = api
        .list_tasks(admin(
            &b,
            ListTasksRequest {
                state: "active".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(tasks.is_empty());

    // Again: nothing is left, and it says so.
    let again = api
        .revoke_identity(admin(&b, RevokeIdentityRequest { spiffe_id: me }))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_revoked);
    assert_eq!(again.credentials_revoked, 0);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_token_rotates_without_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let b = start(&uid_rule()).await;
    let mut api = AdminClient::new(b.tls_channel().await);
    let file = b.dir.path().join("admin.token");
    let with = |token: &str| {
        let mut r = Request::new(ListTasksRequest::default());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let old = b.admin_token();
    api.list_tasks(with(&old)).await.unwrap();

    // Rotate: the new token works at once, and the previous one during the overlap.
    let new = ephemera::api::admin::rotate_token_file(&file, true).unwrap();
    assert_ne!(new, old);
    api.list_tasks(with(&new)).await.unwrap();
    api.list_tasks(with(&old)).await.unwrap();
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A broken edit is refused and the tokens in force keep working.
    let rotated = std::fs::read_to_string(&file).unwrap();
    assert_eq!(rotated, format!("{new}\n{old}\n"));
    std::fs::write(&file, "short\n").unwrap();
    api.list_tasks(with(&new)).await.unwrap();
    api.list_tasks(with(&old)).await.unwrap();
    std::fs::write(&file, &rotated).unwrap();

    // Finish: only the new token.
    assert!(ephemera::api::admin::finish_token_rotation(&file).unwrap());
    api.list_tasks(with(&new)).await.unwrap();
    let refused = api.list_tasks(with(&old)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(!ephemera::api::admin::finish_token_rotation(&file).unwrap());
    b.running.shutdown().await.unwrap();
}
