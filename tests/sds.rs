//! Envoy's Secret Discovery Service on the workload socket, with a client built from the same
//! protos: the certificate and validation context check out independently (rustls-webpki,
//! ring), an ACK is not answered, SVIDs rotate at half their lifetime as new versions, a
//! closed stream revokes its SVIDs (CRL), and FetchSecrets answers once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::sds::{bytes, chain_and_roots, pems, request, secrets};
use common::*;
use ephemera::api::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use ephemera::api::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use ephemera::clock::Clock;
use ring::signature::KeyPair;
use tonic::transport::Channel;

async fn sds(b: &TestBroker) -> SecretDiscoveryServiceClient<Channel> {
    common::sds::client(b.running.endpoints.workload_socket.as_ref().unwrap()).await
}

/// Checks a tls_certificate against a validation context: the chain verifies with webpki
/// against the context's trusted CA, and the private key is the leaf's. Returns the leaf's
/// serial (hex).
fn check(cert: &Secret, validation: &Secret, b: &TestBroker) -> String {
    let Some(secret::Type::TlsCertificate(tls)) = &cert.r#type else {
        panic!("{} is not a tls_certificate", cert.name)
    };
    let (chain, roots) = chain_and_roots(cert, validation);
    assert_eq!(roots, b.running.broker.ca().keys().roots);
    verify_chain(&chain, &roots, b.clock.now());
    let key = pems(&bytes(&tls.private_key), "PRIVATE KEY");
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &key[0],
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        pair.public_key().as_ref(),
        "the private key belongs to the certificate"
    );
    let uri = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap();
    assert_eq!(uri, format!("spiffe://{TD}/uid/{}", my_uid()));
    hex(leaf.raw_serial())
}

#[tokio::test]
async fn envoy_gets_rotating_svids_and_its_bundle_and_exiting_revokes_them() {
    let b = start(&format!(
        "{}\n[x509_svid]\ndefault_ttl = \"6s\"\n",
        uid_rule()
    ))
    .await;
    let mut client = sds(&b).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(&["default", "ROOTCA"], "", ""))
        .await
        .unwrap();
    let mut responses = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    let got = secrets(&first);
    assert_eq!(
        got.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["default", "ROOTCA"]
    );
    let first_serial = check(&got[0], &got[1], &b);

    // Envoy ACKs: nothing new is sent for it.
    tx.send(request(
        &["default", "ROOTCA"],
        &first.version_info,
        &first.nonce,
    ))
    .await
    .unwrap();
    // At half of the 6s lifetime the SVID is replaced: a new version with a new certificate.
    let rotated = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a rotated SVID within 10s")
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_secs(5),
        "the first response after the ACK came after {waited:?}: it must be the rotation"
    );
    assert_ne!(rotated.version_info, first.version_info);
    assert_ne!(rotated.nonce, first.nonce);
    let got = secrets(&rotated);
    let second_serial = check(&got[0], &got[1], &b);
    assert_ne!(second_serial, first_serial);

    // Envoy exits: the stream closes, its task ends, and its SVID is revoked.
    drop(tx);
    drop(responses);
    crl_listing(&b, &second_serial).await;
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn names_envoy_may_ask_for_and_a_one_shot_fetch() {
    let b = start(&uid_rule()).await;
    let me = format!("spiffe://{TD}/uid/{}", my_uid());
    let mut client = sds(&b).await;
    let td_uri = format!("spiffe://{TD}");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request(&[&me, TD, &td_uri, "ALL", "nobody"], "", ""))
        .await
        .unwrap();
    let mut responses = client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let got = secrets(&responses.message().await.unwrap().unwrap());
    // Unknown names are left out; the rest are answered in order.
    let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [me.as_str(), TD, td_uri.as_str(), "ALL"]);
    for validation in &got[1..] {
        check(&got[0], validation, &b);
    }
    // A new set of names is answered at once.
    tx.send(request(&["ROOTCA"], "1", "")).await.unwrap();
    let got = secrets(
        &tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, "ROOTCA");
    drop(tx);

    // FetchSecrets: one answer, standalone SVIDs.
    let fetched = client
        .fetch_secrets(request(&["default", "ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    let got = secrets(&fetched);
    let serial = check(&got[0], &got[1], &b);
    let lease = b
        .running
        .broker
        .store()
        .lease(&serial)
        .await
        .unwrap()
        .unwrap();
    assert!(lease.active(b.clock.unix_now()));
    assert_eq!(lease.lease.task_id, None);

    // A request for another resource type is refused.
    let mut wrong = request(&["default"], "", "");
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let err = client.fetch_secrets(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    b.running.shutdown().await.unwrap();
}
