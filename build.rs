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

/// The commit the build is made from (`unknown` outside a git checkout), and the build date
/// (`SOURCE_DATE_EPOCH` when set, for reproducible builds; else today), for `--version`.
fn version_info() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    // A build without the repository (a container build context) can name it.
    println!("cargo:rerun-if-env-changed=EPHEMERA_COMMIT");
    let commit = std::env::var("EPHEMERA_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EPHEMERA_COMMIT={commit}");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
        });
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    println!("cargo:rustc-env=EPHEMERA_BUILD_DATE={year:04}-{month:02}-{day:02}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // Rebuilt when the checkout moves to another commit; paths that do not exist are not
    // named (cargo would rerun this script on every build).
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        let mut watched = vec![git_dir.join("HEAD"), git_dir.join("packed-refs")];
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(git_dir.join(head_ref));
        }
        for path in watched.into_iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    version_info();
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
