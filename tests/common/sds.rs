//! An SDS client built from Envoy's protos: requests, ACKs and reading the secrets of a
//! response.

use ephemera::api::pb::envoy::config::core::v3::{DataSource, data_source};
use ephemera::api::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use ephemera::api::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use ephemera::api::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use ephemera::api::sds::SECRET_TYPE;
use ephemera::client::ConnectOptions;
use prost::Message;
use tonic::transport::Channel;

/// An SDS client on the workload socket.
pub async fn client(socket: &std::path::Path) -> SecretDiscoveryServiceClient<Channel> {
    let channel = ConnectOptions {
        socket: Some(socket.to_path_buf()),
        ..ConnectOptions::default()
    }
    .connect()
    .await
    .unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

/// A request for `names`; with the version and nonce of a response it is that response's ACK.
pub fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        response_nonce: nonce.into(),
        ..DiscoveryRequest::default()
    }
}

pub fn bytes(d: &Option<DataSource>) -> Vec<u8> {
    match d.as_ref().and_then(|d| d.specifier.clone()) {
        Some(data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("inline bytes expected, got {other:?}"),
    }
}

pub fn pems(text: &[u8], tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .filter(|p| p.tag() == tag)
        .map(|p| p.into_contents())
        .collect()
}

/// The secrets of a response, by name.
pub fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    assert_eq!(r.type_url, SECRET_TYPE);
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

/// The certificate chain (DER, leaf first) of a `tls_certificate` secret and the trusted CAs
/// (DER) of a `validation_context` secret.
pub fn chain_and_roots(cert: &Secret, validation: &Secret) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let Some(secret::Type::TlsCertificate(tls)) = &cert.r#type else {
        panic!("{} is not a tls_certificate", cert.name)
    };
    let Some(secret::Type::ValidationContext(ctx)) = &validation.r#type else {
        panic!("{} is not a validation_context", validation.name)
    };
    (
        pems(&bytes(&tls.certificate_chain), "CERTIFICATE"),
        pems(&bytes(&ctx.trusted_ca), "CERTIFICATE"),
    )
}
