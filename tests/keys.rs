//! Signing keys at work: the bundle's refresh hint and caching, a forced JWT rotation that is
//! published before it signs, and revoking a compromised intermediate and JWT key: what they
//! signed is revoked (CRL, introspection), a live Workload API stream is given a replacement
//! signed by the successor, and the admin sees it all in `ListSigningKeys`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::{
    ListSigningKeysRequest, MintJwtSvidRequest, RevokeSigningKeyRequest, RotateSigningKeyRequest,
};
use ephemera::clock::Clock;
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

fn admin<T>(b: &TestBroker, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", b.admin_token()).parse().unwrap(),
    );
    r
}

/// `RevokeSigningKey` with the admin token.
async fn revoke_key(
    api: &mut AdminClient<tonic::transport::Channel>,
    b: &TestBroker,
    id: &str,
    reason: &str,
) -> Result<ephemera::api::pb::v1::RevokeSigningKeyResponse, tonic::Status> {
    api.revoke_signing_key(admin(
        b,
        RevokeSigningKeyRequest {
            id: id.into(),
            reason: reason.into(),
        },
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn mint_jwt(b: &TestBroker) -> String {
    b.unix_client()
        .await
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["rp".into()],
            ttl_seconds: Some(600),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

#[tokio::test]
async fn bundles_say_how_long_to_cache_and_rotation_publishes_first() {
    let b = start(&format!("{}\n[ca]\njwt_key_ttl = \"1d\"\n", uid_rule())).await;
    let base = &b.running.endpoints.http_addr;
    let res = reqwest_like_get(base, "/keys").await.to_ascii_lowercase();
    assert!(res.contains("cache-control: public, max-age=2880"), "{res}");
    let (_, bundle) = b.http_get("/bundle").await;
    let bundle: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    assert_eq!(bundle["spiffe_refresh_hint"], 2880, "a thirtieth of a day");
    let sequence = bundle["spiffe_sequence"].as_u64().unwrap();

    let mut api = AdminClient::new(b.tls_channel().await);
    let next = api
        .rotate_signing_key(admin(
            &b,
            RotateSigningKeyRequest {
                kind: "jwt".into(),
                immediately: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.state, "prepared");
    // Published now, in /keys and /bundle, with a new sequence; tokens still use the old key.
    let (_, jwks) = b.http_get("/keys").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&next.id.as_str()));
    let (_, bundle) = b.http_get("/bundle").await;
    let bundle: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    assert!(bundle["spiffe_sequence"].as_u64().unwrap() > sequence);
    let token = mint_jwt(&b).await;
    let (header, _) = verify_jwt(&token, &jwks);
    assert_ne!(header["kid"], next.id.as_str());
    // Two refresh hints later it signs.
    b.clock.advance(Duration::from_secs(2 * 2880));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let token = mint_jwt(&b).await;
        let (header, _) = verify_jwt(&token, &jwks);
        if header["kid"] == next.id.as_str() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key never signed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused input.
    let err = api
        .rotate_signing_key(admin(
            &b,
            RotateSigningKeyRequest {
                kind: "x509-leaf".into(),
                immediately: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The root is offline here: the broker cannot make a root.
    let err = api
        .rotate_signing_key(admin(
            &b,
            RotateSigningKeyRequest {
                kind: "x509-root".into(),
                immediately: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("ephemera ca new-root"),
        "{}",
        err.message()
    );
    // The root is offline here: an intermediate cannot be forced without a staged one.
    let err = api
        .rotate_signing_key(admin(
            &b,
            RotateSigningKeyRequest {
                kind: "x509-intermediate".into(),
                immediately: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("ephemera ca stage"),
        "{}",
        err.message()
    );
    b.running.shutdown().await.unwrap();
}

/// The raw response (head and body) of a GET, to read its headers.
async fn reqwest_like_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn revoking_a_key_revokes_what_it_signed_and_replaces_it_on_live_streams() {
    let b = start(&format!("{}\n[ca]\nroot_key = \"online\"\n", uid_rule())).await;
    let socket = b.running.endpoints.workload_socket.clone().unwrap();
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = contexts.next().await.unwrap().unwrap();
    let (chain, _) = context_chain_and_roots(&first);
    let old_intermediate = key_id(&chain[1]);
    let (_, bundle) = b.http_get("/bundle").await;
    let roots = bundle_roots(&serde_json::from_str(&bundle).unwrap());
    assert_eq!(
        key_id(&serving_chain(&b, &roots).await[1]),
        old_intermediate,
        "the TLS listener's certificate is from the active intermediate"
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let old_serial = hex(leaf.raw_serial());
    let token = mint_jwt(&b).await;
    assert_eq!(introspect_http(&b, &token).await["active"], true);

    let mut api = AdminClient::new(b.tls_channel().await);
    let keys = api
        .list_signing_keys(admin(&b, ListSigningKeysRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(keys.root_online);
    let active = |kind: &str| {
        keys.keys
            .iter()
            .find(|k| k.kind == kind && k.state == "active")
            .unwrap()
            .clone()
    };
    let x509 = active("x509-intermediate");
    assert_eq!(x509.id, old_intermediate, "the id is the key's thumbprint");
    assert!(x509.live_credentials >= 1);
    let jwt = active("jwt");
    assert!(jwt.live_credentials >= 1);
    let (_, jwks) = b.http_get("/keys").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(verify_jwt(&token, &jwks).0["kid"], jwt.id.as_str());

    // The intermediate leaks.
    let r = revoke_key(&mut api, &b, &x509.id, "intermediate leaked")
        .await
        .unwrap();
    assert!(r.credentials_revoked >= 1);
    assert!(r.cursor > 0);
    assert_eq!(r.key.unwrap().state, "revoked");
    // The live stream gets a replacement signed by the successor, which verifies.
    let (replaced, _) = replacement_not_under(&mut contexts, &old_intermediate).await;
    let (_, bundle) = b.http_get("/bundle").await;
    let roots = bundle_roots(&serde_json::from_str(&bundle).unwrap());
    verify_chain(&replaced, &roots, SystemTime::now());
    // The TLS listener serves a certificate from the successor for new connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let serving = serving_chain(&b, &roots).await;
        if key_id(&serving[1]) != old_intermediate {
            assert_eq!(key_id(&serving[1]), key_id(&replaced[1]));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TLS listener still serves a certificate from the revoked intermediate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old certificate is listed by its intermediate's CRL (its distribution point), which
    // webpki checks against the old intermediate's key.
    let (_, old) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let dp = format!("{:?}", old.extensions());
    assert!(dp.contains(&format!("/crl/{old_intermediate}")), "{dp}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let crl = loop {
        let (status, crl) = http_get_bytes(
            &b.running.endpoints.http_addr,
            &format!("/crl/{old_intermediate}"),
        )
        .await;
        assert_eq!(status, 200);
        let (_, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
        if parsed
            .iter_revoked_certificates()
            .any(|c| hex(c.raw_serial()) == old_serial)
        {
            break crl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old certificate is not in its intermediate's CRL within 5s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(
        check_with_crl(&chain, &roots, &crl, SystemTime::now()),
        Err(webpki::Error::CertRevoked)
    ));

    // The JWT key leaks: its token is no longer honoured nor published.
    let r = revoke_key(&mut api, &b, &jwt.id, "jwt key leaked")
        .await
        .unwrap();
    assert!(r.credentials_revoked >= 1);
    assert_eq!(introspect_http(&b, &token).await["active"], false);
    let (_, jwks) = b.http_get("/keys").await;
    assert!(!jwks.contains(&jwt.id), "{jwks}");
    let fresh = mint_jwt(&b).await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_ne!(verify_jwt(&fresh, &jwks).0["kid"], jwt.id.as_str());

    // What the admin sees; revoking again is accepted and revokes nothing more.
    let keys = api
        .list_signing_keys(admin(&b, ListSigningKeysRequest {}))
        .await
        .unwrap()
        .into_inner();
    let revoked: Vec<_> = keys.keys.iter().filter(|k| k.state == "revoked").collect();
    assert_eq!(revoked.len(), 2);
    assert!(revoked.iter().any(|k| k.note == "intermediate leaked"));
    let again = revoke_key(&mut api, &b, &jwt.id, "jwt key leaked")
        .await
        .unwrap();
    assert_eq!(again.credentials_revoked, 0);
    for (id, reason, code) in [
        ("nope", "r", Code::NotFound),
        ("", "r", Code::InvalidArgument),
        ("x", "", Code::InvalidArgument),
    ] {
        let err = revoke_key(&mut api, &b, id, reason).await.unwrap_err();
        assert_eq!(err.code(), code, "{id:?}: {err:?}");
    }
    // Without the admin token.
    let err = api
        .list_signing_keys(Request::new(ListSigningKeysRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    b.running.shutdown().await.unwrap();
}

/// A root made by the broker (`ca rotate --root`) reaches a live Workload API stream and
/// `/bundle` before anything chains to it; the SVIDs keep verifying under the old root.
#[tokio::test]
async fn a_new_root_is_pushed_to_live_streams_before_it_is_used() {
    let b = start(&format!("{}\n[ca]\nroot_key = \"online\"\n", uid_rule())).await;
    let socket = b.running.endpoints.workload_socket.clone().unwrap();
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let (chain, roots) = context_chain_and_roots(&contexts.next().await.unwrap().unwrap());
    assert_eq!(roots.len(), 1);
    let (_, bundle) = b.http_get("/bundle").await;
    let sequence = serde_json::from_str::<serde_json::Value>(&bundle).unwrap()["spiffe_sequence"]
        .as_u64()
        .unwrap();

    let mut api = AdminClient::new(b.tls_channel().await);
    let root = api
        .rotate_signing_key(admin(
            &b,
            RotateSigningKeyRequest {
                kind: "x509-root".into(),
                immediately: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (root.kind.as_str(), root.state.as_str()),
        ("x509-root", "prepared")
    );
    let pushed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let c = contexts.next().await.unwrap().unwrap();
            let (chain, roots) = context_chain_and_roots(&c);
            if roots.len() == 2 {
                break (chain, roots);
            }
        }
    })
    .await
    .expect("the new root on the live stream within 5s");
    assert_eq!(
        key_id(&pushed.0[1]),
        key_id(&chain[1]),
        "nothing chains to the new root yet"
    );
    verify_chain(&pushed.0, &pushed.1, b.clock.now());
    let (_, bundle) = b.http_get("/bundle").await;
    let bundle: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    assert_eq!(bundle_roots(&bundle).len(), 2);
    assert!(bundle["spiffe_sequence"].as_u64().unwrap() > sequence);
    b.running.shutdown().await.unwrap();
}

/// Keys of one minute on real time: a Workload API client (the `spiffe` crate) streams
/// X.509-SVIDs, an SDS client (Envoy's protos) streams and ACKs its certificate and validation
/// context, JWT-SVIDs are minted every half second, and a relying party caches `/keys` for as
/// long as its `Cache-Control` allows; every credential verifies, across at least three
/// rotations of each key. The broker's clock is steady real time, so a step of the machine's
/// wall clock cannot end the streams' tasks under the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_verify_continuously_across_three_rotations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/all.cedar"), ALLOW_ALL).unwrap();
    let ttl = Duration::from_secs(60);
    let clock = SteadyClock::new();
    ephemera::ca::keys::init(
        dir.path(),
        &TD.parse().unwrap(),
        ephemera::ca::keys::InitOptions {
            root_ttl: Duration::from_secs(86_400),
            intermediate_ttl: ttl,
        },
        clock.now(),
    )
    .unwrap();
    let extra = format!(
        "[ca]\nroot_key = \"online\"\nintermediate_ttl = \"60s\"\njwt_key_ttl = \"60s\"\n\
         [x509_svid]\ndefault_ttl = \"8s\"\nmax_ttl = \"10s\"\n\
         [jwt_svid]\ndefault_ttl = \"8s\"\nmax_ttl = \"10s\"\n{}",
        uid_rule()
    );
    let config =
        ephemera::config::Config::from_toml(&config_text(dir.path(), &extra), Path::new("/"))
            .unwrap();
    let running = ephemera::app::start(config, Arc::new(clock)).await.unwrap();
    let socket = running.endpoints.workload_socket.clone().unwrap();
    let http = running.endpoints.http_addr.clone();
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();

    // X.509: every SVID the stream gives verifies against the bundle it came with.
    let x509 = tokio::spawn({
        let client = client.clone();
        async move {
            let mut contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
            let mut intermediates: Vec<String> = Vec::new();
            let mut verified = 0;
            while intermediates.len() < 4 {
                let c = contexts.next().await.unwrap().unwrap();
                let (chain, roots) = context_chain_and_roots(&c);
                verify_chain(&chain, &roots, clock.now());
                verified += 1;
                let id = key_id(&chain[1]);
                if !intermediates.contains(&id) {
                    intermediates.push(id);
                }
            }
            verified
        }
    });

    // SDS: every certificate Envoy is sent verifies against the validation context sent with
    // it; each response is ACKed.
    let sds = tokio::spawn({
        let socket = socket.clone();
        async move {
            let names = ["default", "ROOTCA"];
            let mut client = common::sds::client(&socket).await;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(common::sds::request(&names, "", "")).await.unwrap();
            let mut responses = client
                .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut intermediates: Vec<String> = Vec::new();
            let mut verified = 0;
            while intermediates.len() < 4 {
                let r = responses.message().await.unwrap().unwrap();
                let got = common::sds::secrets(&r);
                let (chain, roots) = common::sds::chain_and_roots(&got[0], &got[1]);
                verify_chain(&chain, &roots, clock.now());
                verified += 1;
                let id = key_id(&chain[1]);
                if !intermediates.contains(&id) {
                    intermediates.push(id);
                }
                tx.send(common::sds::request(&names, &r.version_info, &r.nonce))
                    .await
                    .unwrap();
            }
            verified
        }
    });

    // JWT: a relying party that refetches /keys only when its max-age has passed.
    let mut minter = ephemera::client::ConnectOptions {
        socket: Some(running.endpoints.broker_socket.clone()),
        ..Default::default()
    }
    .broker()
    .await
    .unwrap();
    let mut cached: Option<(serde_json::Value, tokio::time::Instant)> = None;
    let mut kids: Vec<String> = Vec::new();
    let mut verified = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while kids.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} JWT keys in 240s",
            kids.len()
        );
        let token = minter
            .mint_jwt_svid(MintJwtSvidRequest {
                audience: vec!["rp".into()],
                ttl_seconds: None,
                spiffe_id: String::new(),
                task_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let fresh = cached
            .as_ref()
            .is_some_and(|(_, until)| tokio::time::Instant::now() < *until);
        if !fresh {
            let head = reqwest_like_get(&http, "/keys").await;
            let max_age: u64 = head
                .split("max-age=")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|s| s.parse().ok())
                .expect("/keys has a max-age");
            assert!(max_age <= 2, "a thirtieth of a minute: {max_age}");
            let body = head.split("\r\n\r\n").nth(1).unwrap();
            // The body may be chunked: take the JSON object in it.
            let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
            cached = Some((
                serde_json::from_str(json).unwrap(),
                tokio::time::Instant::now() + Duration::from_secs(max_age),
            ));
        }
        let (header, _) = verify_jwt(&token, &cached.as_ref().unwrap().0);
        verified += 1;
        let kid = header["kid"].as_str().unwrap().to_owned();
        if !kids.contains(&kid) {
            kids.push(kid);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let svids = tokio::time::timeout(Duration::from_secs(120), x509)
        .await
        .expect("four intermediates within the time")
        .unwrap();
    assert!(svids >= 8, "{svids} X.509-SVIDs verified");
    let secrets = tokio::time::timeout(Duration::from_secs(120), sds)
        .await
        .expect("four intermediates over SDS within the time")
        .unwrap();
    assert!(secrets >= 8, "{secrets} SDS certificates verified");
    assert!(verified >= 8, "{verified} JWT-SVIDs verified");
    running.shutdown().await.unwrap();
}
