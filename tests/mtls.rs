//! mTLS (`x509pop`) attestation: a client certificate chaining to a configured CA gets an
//! identity from its claims; untrusted and expired certificates get `Unauthenticated` with the
//! reason, not an opaque handshake failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use ephemera::api::pb::v1::MintX509SvidRequest;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::clock::Clock;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn client_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap())
        .unwrap()
}

fn client_cert(
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    not_after: SystemTime,
) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = vec![SanType::DnsName(
        format!("{cn}.ci.example.org").try_into().unwrap(),
    )];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
    p.not_after = not_after.into();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn mtls_client(
    b: &TestBroker,
    identity: (String, String),
) -> BrokerClient<tonic::transport::Channel> {
    let bundle = std::fs::read(&b.running.endpoints.ca_bundle).unwrap();
    let channel = Endpoint::from_shared(b.running.endpoints.grpc_addr.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bundle))
                .identity(Identity::from_pem(identity.0, identity.1)),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake succeeds whatever the client certificate");
    BrokerClient::new(channel)
}

#[tokio::test]
async fn client_certificates_are_attested_per_request() {
    let cas = tempfile::tempdir().unwrap();
    let ca = client_ca("Build Farm CA");
    let bundle = cas.path().join("clients.pem");
    std::fs::write(&bundle, ca.pem()).unwrap();
    let extra = format!(
        "[x509pop]\nca_bundles = [\"{}\"]\n\n[[mapping]]\nattestor = \"x509pop\"\nspiffe_id = \"spiffe://{{trust_domain}}/host/{{claims.cn}}\"\nmatch = {{ san_dns = \"build-01.ci.example.org\" }}\n",
        bundle.display()
    );
    let b = start(&extra).await;
    let in_an_hour = SystemTime::now() + Duration::from_secs(3600);

    let mut good = mtls_client(&b, client_cert(&ca, "build-01", in_an_hour)).await;
    let resp = good
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, format!("spiffe://{TD}/host/build-01"));
    verify_chain(&resp.cert_chain, &resp.bundle, b.clock.now());

    // Trusted CA, but no mapping rule matches its SANs.
    let mut unmapped = mtls_client(&b, client_cert(&ca, "build-02", in_an_hour)).await;
    let err = unmapped
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let rogue = client_ca("Rogue CA");
    let mut untrusted = mtls_client(&b, client_cert(&rogue, "build-01", in_an_hour)).await;
    let err = untrusted
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("trusted CA"), "{}", err.message());

    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let mut expired = mtls_client(&b, client_cert(&ca, "build-01", an_hour_ago)).await;
    let err = expired
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    // The good certificate expires by the broker's clock too: checked on every request.
    b.clock.advance(Duration::from_secs(2 * 3600));
    let err = good
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    b.running.shutdown().await.unwrap();
}
