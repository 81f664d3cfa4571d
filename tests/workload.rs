//! The SPIFFE Workload API, exercised with an independent client (the `spiffe` crate): X.509
//! context and both bundle kinds, JWT-SVIDs validated locally (ring, against the JWT bundle) and
//! through ValidateJWTSVID, the security header, rotation at half-life, and a killed workload's
//! SVIDs revoked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::*;
use ephemera::clock::Clock;
use spiffe::{TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;

fn endpoint(b: &TestBroker) -> String {
    format!(
        "unix://{}",
        b.running
            .endpoints
            .workload_socket
            .as_ref()
            .unwrap()
            .display()
    )
}

#[tokio::test]
async fn standard_client_gets_verifiable_x509_and_jwt_svids() {
    let b = start(&uid_rule()).await;
    let client = WorkloadApiClient::connect_to(endpoint(&b)).await.unwrap();
    let td = TrustDomain::new(TD).unwrap();

    let ctx = client.fetch_x509_context().await.unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        format!("spiffe://{TD}/uid/{}", my_uid())
    );
    let bundle = ctx
        .bundle_set()
        .get(&td)
        .expect("bundle for our trust domain");
    let roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    verify_chain(&chain, &roots, b.clock.now());
    // The key the client got belongs to the certificate.
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        svid.private_key().as_ref(),
        &rng,
    )
    .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        ring::signature::KeyPair::public_key(&key).as_ref(),
        leaf.public_key().subject_public_key.data.as_ref()
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(
        bundles.get(&td).unwrap().authorities()[0].as_bytes(),
        roots[0].as_slice()
    );

    // JWT-SVID: kid always present, verified locally against the JWT bundle with ring.
    let jwt = client.fetch_jwt_svid(&["payments"], None).await.unwrap();
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let keys: Vec<serde_json::Value> = jwt_bundles
        .get(&td)
        .unwrap()
        .jwt_authorities()
        .map(|a| {
            let mut k: serde_json::Value = serde_json::from_slice(a.jwk_json()).unwrap();
            k["kid"] = serde_json::Value::from(a.key_id());
            k
        })
        .collect();
    let (header, claims) = verify_jwt(jwt.token(), &serde_json::json!({ "keys": keys }));
    assert!(header["kid"].is_string());
    assert_eq!(claims["aud"], "payments");
    assert_eq!(claims["sub"], svid.spiffe_id().to_string());

    // And through ValidateJWTSVID.
    let validated = client
        .validate_jwt_token("payments", jwt.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), svid.spiffe_id());
    assert!(
        client
            .validate_jwt_token("other-audience", jwt.token())
            .await
            .is_err()
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn calls_without_the_security_header_are_refused() {
    use ephemera::api::pb::workload::{JwtsvidRequest, X509svidRequest};
    let b = start(&uid_rule()).await;
    let mut raw = raw_client(&b).await;
    let err = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // With the header but no identity: PermissionDenied.
    b.running.broker.set_mapper(ephemera::policy::Mapper::new(
        TD.parse().unwrap(),
        Vec::new(),
    ));
    let err = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn svids_rotate_at_half_life_on_the_open_stream() {
    let b = start(&format!(
        "{}\n[x509_svid]\ndefault_ttl = \"6s\"\n",
        uid_rule()
    ))
    .await;
    let client = WorkloadApiClient::connect_to(endpoint(&b)).await.unwrap();
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = contexts.next().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    let serial = |c: &spiffe::X509Context| {
        let svid = c.default_svid().unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
        leaf.raw_serial().to_vec()
    };
    let first_serial = serial(&first);
    let rotated = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), contexts.next())
            .await
            .expect("a rotated SVID within 10s")
            .unwrap()
            .unwrap();
        if serial(&next) != first_serial {
            break next;
        }
    };
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_secs(5),
        "rotated after {waited:?}, expected about half of 6s"
    );
    assert_eq!(
        rotated.default_svid().unwrap().spiffe_id(),
        first.default_svid().unwrap().spiffe_id()
    );
    b.running.shutdown().await.unwrap();
}

/// Run as a child process by `a_killed_workloads_svids_are_revoked`: opens FetchX509SVID, prints
/// its SVID's serial, and waits to be killed.
#[tokio::test]
async fn child_workload() {
    let Ok(socket) = std::env::var("EPHEMERA_TEST_CHILD_SOCKET") else {
        return;
    };
    let client = WorkloadApiClient::connect_to(format!("unix://{socket}"))
        .await
        .unwrap();
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let ctx = contexts.next().await.unwrap().unwrap();
    let (_, leaf) =
        x509_parser::parse_x509_certificate(ctx.default_svid().unwrap().leaf().as_bytes()).unwrap();
    let serial = hex(leaf.raw_serial());
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "SERIAL={serial}").unwrap();
    loop {
        let _ = contexts.next().await;
    }
}

#[tokio::test]
async fn a_killed_workloads_svids_are_revoked() {
    use std::io::BufRead;
    let b = start(&uid_rule()).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_workload",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "EPHEMERA_TEST_CHILD_SOCKET",
            b.running.endpoints.workload_socket.as_ref().unwrap(),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let serial = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split("SERIAL=").nth(1).map(|s| s.trim().to_owned()))
    })
    .await
    .unwrap()
    .expect("child printed its serial");
    let lease = b
        .running
        .broker
        .store()
        .lease(&serial)
        .await
        .unwrap()
        .unwrap();
    let now = b.clock.unix_now();
    assert!(lease.active(now));

    let mut events = b.running.broker.bus().subscribe();
    child.kill().unwrap();
    child.wait().unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .expect("task revoked within the grace")
        .unwrap();
    assert_eq!(ev.task_id, lease.lease.task_id);
    assert!(
        !b.running
            .broker
            .store()
            .lease(&serial)
            .await
            .unwrap()
            .unwrap()
            .active(now)
    );
    crl_listing(&b, &serial).await;
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_identities_come_with_unique_hints_and_the_first_is_the_default() {
    let two_rules = format!(
        "{}\n[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{{trust_domain}}/svc/agent\"\nmatch = {{ uid = {} }}\n",
        uid_rule(),
        my_uid()
    );
    let b = start(&two_rules).await;
    let client = WorkloadApiClient::connect_to(endpoint(&b)).await.unwrap();
    let svids = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        [
            format!("spiffe://{TD}/uid/{}", my_uid()),
            format!("spiffe://{TD}/svc/agent")
        ]
    );
    let hints: Vec<&str> = svids.iter().map(|s| s.hint().unwrap()).collect();
    assert_eq!(hints, [format!("uid/{}", my_uid()).as_str(), "svc/agent"]);
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.default_svid().unwrap().spiffe_id().to_string(), ids[0]);
    // JWT-SVIDs: one per identity, or only the one asked for.
    let all = client.fetch_all_jwt_svids(&["a"], None).await.unwrap();
    assert_eq!(all.len(), 2);
    let agent: spiffe::SpiffeId = format!("spiffe://{TD}/svc/agent").parse().unwrap();
    let one = client.fetch_jwt_svid(&["a"], Some(&agent)).await.unwrap();
    assert_eq!(one.spiffe_id(), &agent);
    b.running.shutdown().await.unwrap();
}

/// A raw `SpiffeWorkloadAPI` client (the `spiffe` crate does not expose the CRL field).
async fn raw_client(
    b: &TestBroker,
) -> ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    let channel = ephemera::client::connect(
        &ephemera::client::Target::Socket(b.running.endpoints.workload_socket.clone().unwrap()),
        std::path::Path::new("/nonexistent"),
    )
    .await
    .unwrap();
    ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

/// Opens a `FetchX509SVID` stream (one task) on `raw`.
async fn open_x509_stream(
    raw: &mut ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    >,
) -> tonic::Streaming<ephemera::api::pb::workload::X509svidResponse> {
    raw.fetch_x509svid(with_header(ephemera::api::pb::workload::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

/// The serials (hex) a CRL lists, read with x509-parser.
fn crl_serials(der: &[u8]) -> Vec<String> {
    let (rest, crl) = x509_parser::parse_x509_crl(der).unwrap();
    assert!(rest.is_empty());
    crl.iter_revoked_certificates()
        .map(|r| hex(r.raw_serial()))
        .collect()
}

/// Mints an X.509-SVID over the broker API in a task of its own and ends the task; returns the
/// serial once `/crl` lists it (a new CRL was built).
async fn revoke_one(b: &TestBroker) -> String {
    use ephemera::api::pb::v1::{BeginTaskRequest, EndTaskRequest, MintX509SvidRequest};
    let mut client = b.unix_client().await;
    let task = client
        .begin_task(BeginTaskRequest::default())
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
    client
        .end_task(EndTaskRequest {
            task_id: task.task_id,
        })
        .await
        .unwrap();
    crl_listing(b, &x.serial).await;
    x.serial
}

/// Reads a stream's messages with the time each arrived, until one's CRL lists `serials`
/// serials (bounded: 15s per message).
fn read_until_listed<T: Send + 'static>(
    mut stream: tonic::Streaming<T>,
    serials: usize,
    crl: fn(&T) -> &[bytes::Bytes],
) -> tokio::task::JoinHandle<Vec<(tokio::time::Instant, T)>> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(15), stream.message())
                .await
                .expect("a CRL update within 15s")
                .unwrap()
                .expect("the stream stays open");
            let done = crl(&m)
                .first()
                .is_some_and(|c| crl_serials(c).len() >= serials);
            got.push((tokio::time::Instant::now(), m));
            if done {
                return got;
            }
        }
    })
}

#[tokio::test]
async fn streams_carry_the_crl_and_pace_its_updates() {
    use ephemera::api::pb::workload::X509BundlesRequest;
    let interval = Duration::from_secs(2);
    let b = start(&format!(
        "{}\n[workload_api]\ncrl_push_interval = \"2s\"\n",
        uid_rule()
    ))
    .await;
    let mut raw = raw_client(&b).await;
    let svids = open_x509_stream(&mut raw).await;
    let bundles = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let svid_updates = read_until_listed(svids, 3, |m| &m.crl);
    let bundle_updates = read_until_listed(bundles, 3, |m| &m.crl);

    // Three revocations, each a new CRL, in quick succession.
    let mut revoked = Vec::new();
    for _ in 0..3 {
        revoked.push(revoke_one(&b).await);
    }
    revoked.sort();

    let svid_updates = svid_updates.await.unwrap();
    let bundle_updates = bundle_updates.await.unwrap();
    // The first response of each carries the CRL (nothing revoked yet) with the SVID or bundle.
    let first = &svid_updates[0].1;
    assert_eq!(first.svids.len(), 1);
    assert!(!first.svids[0].x509_svid.is_empty() && !first.svids[0].x509_svid_key.is_empty());
    assert_eq!(first.crl.len(), 1, "the first response carries the CRL");
    assert!(crl_serials(&first.crl[0]).is_empty());
    assert_eq!(bundle_updates[0].1.crl, first.crl);
    assert_eq!(bundle_updates[0].1.bundles.len(), 1);
    // Then CRL-only updates, no closer together than the interval (three CRLs were built in
    // less), the SVID unchanged, until one lists all three serials.
    let crl_only = |updates: &[(tokio::time::Instant, Vec<bytes::Bytes>)], name: &str| {
        assert!(updates.len() >= 2, "{name}: no CRL update");
        for w in updates.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!(
                gap >= interval - Duration::from_millis(300),
                "{name}: CRL updates {gap:?} apart, paced at {interval:?}"
            );
        }
        let mut last = crl_serials(&updates[updates.len() - 1].1[0]);
        last.sort();
        assert_eq!(
            last, revoked,
            "{name}: the last update lists every revoked serial"
        );
    };
    for (_, m) in &svid_updates[1..] {
        assert_eq!(m.svids, first.svids, "a CRL-only update keeps the SVID");
    }
    crl_only(
        &svid_updates
            .into_iter()
            .map(|(t, m)| (t, m.crl))
            .collect::<Vec<_>>(),
        "FetchX509SVID",
    );
    crl_only(
        &bundle_updates
            .into_iter()
            .map(|(t, m)| (t, m.crl))
            .collect::<Vec<_>>(),
        "FetchX509Bundles",
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crl_larger_than_the_limit_is_left_out_and_the_streams_go_on() {
    use ephemera::api::pb::workload::X509BundlesRequest;
    // Smaller than any CRL; updates would be immediate.
    let b = start(&format!(
        "{}\n[workload_api]\ncrl_max_bytes = 64\ncrl_push_interval = \"0s\"\n",
        uid_rule()
    ))
    .await;
    let mut raw = raw_client(&b).await;
    let mut svids = open_x509_stream(&mut raw).await;
    let mut bundles = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = svids.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1, "the SVID still comes");
    assert!(first.crl.is_empty(), "the CRL is left out");
    let first_bundles = bundles.message().await.unwrap().unwrap();
    assert_eq!(first_bundles.bundles.len(), 1);
    assert!(first_bundles.crl.is_empty());

    // A new CRL (served at /crl) is not pushed: it would be left out again.
    let serial = revoke_one(&b).await;
    assert!(crl_serials(&crl_listing(&b, &serial).await).contains(&serial));
    for (name, next) in [
        (
            "FetchX509SVID",
            tokio::time::timeout(Duration::from_millis(1500), svids.message())
                .await
                .map(|m| m.map(|m| m.map(|_| ()))),
        ),
        (
            "FetchX509Bundles",
            tokio::time::timeout(Duration::from_millis(1500), bundles.message())
                .await
                .map(|m| m.map(|m| m.map(|_| ()))),
        ),
    ] {
        assert!(next.is_err(), "{name}: nothing to send, got {next:?}");
    }
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_open_stream_keeps_its_task_alive_past_heartbeat_and_grace() {
    let b = start(&format!(
        "{}\n[tasks]\nheartbeat_interval = \"1s\"\ngrace = \"1s\"\n",
        uid_rule()
    ))
    .await;
    let mut raw = raw_client(&b).await;
    let mut svids = open_x509_stream(&mut raw).await;
    let first = svids.message().await.unwrap().unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&first.svids[0].x509_svid).unwrap();
    let serial = hex(leaf.raw_serial());
    // Three times heartbeat + grace pass (on the broker's clock too), with the reaper running:
    // the stream's pings keep the task alive.
    for _ in 0..6 {
        let quiet = tokio::time::timeout(Duration::from_secs(1), svids.message()).await;
        assert!(quiet.is_err(), "the stream stays quiet and open: {quiet:?}");
        b.clock.advance(Duration::from_secs(1));
    }
    let lease = b
        .running
        .broker
        .store()
        .lease(&serial)
        .await
        .unwrap()
        .unwrap();
    assert!(
        lease.active(b.clock.unix_now()),
        "the SVID is still honoured"
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lock_withdraws_the_workloads_open_stream_and_refuses_new_ones() {
    let b = start(&uid_rule()).await;
    let mut raw = raw_client(&b).await;
    let mut stream = open_x509_stream(&mut raw).await;
    let first = stream.message().await.unwrap().expect("the first SVIDs");
    assert!(!first.svids.is_empty());
    b.running
        .broker
        .create_lock(
            ephemera::broker::trust::LockTarget::parse(&format!("claim:uid={}", my_uid())).unwrap(),
            "node quarantined",
            None,
            "test",
        )
        .await
        .unwrap();
    // The open stream is withdrawn, saying why...
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends within 5s");
    let status = ended.expect_err("withdrawn with an error");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("locked: node quarantined"),
        "{status:?}"
    );
    // ...and a new one is refused before policy, with the lock's reason.
    let refused = raw
        .fetch_x509svid(with_header(ephemera::api::pb::workload::X509svidRequest {}))
        .await
        .map(|r| r.into_inner());
    let status = match refused {
        Err(s) => s,
        Ok(mut s) => s.message().await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "locked: node quarantined");
    b.running.shutdown().await.unwrap();
}
