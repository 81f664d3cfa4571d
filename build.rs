//! Compiles the gRPC protos with protox (pure Rust) so no system `protoc` is needed, and writes the
//! encoded descriptor set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/ephemera/v1/admin.proto",
    "proto/ephemera/v1/broker.proto",
    "proto/ephemera/v1/revocations.proto",
    "proto/spiffe/workload.proto",
    "proto/envoy/service/secret/v3/sds.proto",
    "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ephemera_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The CRL is shared, not copied, into every Workload API response that carries it.
        .bytes(".X509SVIDResponse.crl")
        .bytes(".X509BundlesResponse.crl")
        .compile_fds(descriptors)?;
    Ok(())
}
