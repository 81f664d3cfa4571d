//! Store faults on a real file system: the data directory on a small tmpfs that fills up.
//! Requests fail with `UNAVAILABLE`, no credential is returned without its lease, `/readyz` says
//! not ready, and service resumes by itself when space returns. Needs permission to mount a
//! tmpfs (root in CI); elsewhere it says it was skipped. (A store turned read-only is tested on
//! PostgreSQL in tests/replicas.rs.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;
use ephemera::api::pb::v1::MintJwtSvidRequest;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use tonic::Code;
use tonic::transport::Channel;

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn jwt() -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        ..MintJwtSvidRequest::default()
    }
}

/// Mints `n` times; every failure must be UNAVAILABLE. Returns how many failed, and the jtis
/// of the credentials returned.
async fn mint_some(c: &mut BrokerClient<Channel>, n: usize) -> (usize, Vec<String>) {
    let mut failed = 0;
    let mut issued = Vec::new();
    for _ in 0..n {
        match c.mint_jwt_svid(jwt()).await {
            Ok(r) => issued.push(r.into_inner().jti),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                failed += 1;
            }
        }
    }
    (failed, issued)
}

/// Every credential returned has its lease in the store (checked once the store answers).
async fn all_leased(b: &TestBroker, jtis: &[String]) {
    for jti in jtis {
        let lease = b.running.broker.store().lease(jti).await.unwrap();
        assert!(
            lease.is_some(),
            "credential {jti} was returned without a lease"
        );
    }
}

/// Mints until five in a row succeed, within 30s: service resumes by itself.
async fn recover(c: &mut BrokerClient<Channel>, issued: &mut Vec<String>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut streak = 0;
    while streak < 5 {
        let (failed, ok) = mint_some(c, 1).await;
        issued.extend(ok);
        streak = if failed == 0 { streak + 1 } else { 0 };
        assert!(
            tokio::time::Instant::now() < deadline,
            "service did not resume within 30s"
        );
        if failed > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

async fn readyz(b: &TestBroker) -> u16 {
    b.http_get("/readyz").await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stops_issuance_and_service_resumes_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(dir.path(), "4m") else {
        eprintln!("a_full_disk_stops_issuance: skipped: cannot mount a tmpfs here");
        return;
    };
    let b = start_in(
        dir,
        &uid_rule(),
        ephemera::ca::keys::InitOptions::default(),
        ALLOW_ALL,
    )
    .await;
    let mut c = b.unix_client().await;
    let mut issued = Vec::new();
    let (failed, ok) = mint_some(&mut c, 5).await;
    assert_eq!(failed, 0);
    issued.extend(ok);
    assert_eq!(readyz(&b).await, 200);

    // 1. The disk fills up.
    let filler = b.dir.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // Pages freed inside the database file may take a few more leases; then it stops.
    let mut failed = 0;
    for _ in 0..300 {
        let (f, ok) = mint_some(&mut c, 1).await;
        issued.extend(ok);
        failed += f;
        if failed >= 3 {
            break;
        }
    }
    assert!(failed >= 3, "a full disk must stop issuance");
    assert_eq!(readyz(&b).await, 503, "not ready while the disk is full");
    std::fs::remove_file(&filler).unwrap();
    recover(&mut c, &mut issued).await;
    assert_eq!(readyz(&b).await, 200);
    all_leased(&b, &issued).await;

    b.running.shutdown().await.unwrap();
    drop(fs);
}
