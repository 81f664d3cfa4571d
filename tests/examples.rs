//! The programs in examples/ run and reach their end: each checks its own outcome (introspection,
//! the watch stream, the CRL) and exits non-zero when a check fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries' directory.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} missing: run through `cargo test`, which builds examples",
        path.display()
    );
    path
}

/// Runs an example in an empty directory (so it finds no running broker) and returns stdout.
fn run(name: &str) -> String {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(example(name))
        .current_dir(cwd.path())
        .env_remove("EPHEMERA_ADDR")
        .env_remove("EPHEMERA_DATA_DIR")
        .env_remove("ACTIONS_ID_TOKEN_REQUEST_URL")
        .env("EPHEMERA_EXAMPLE_ROUNDS", "3")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn jit_token_fetches_and_refreshes() {
    let out = run("jit_token");
    assert_eq!(out.matches("introspection: active").count(), 3, "{out}");
    assert!(out.contains("ok: 3 tokens fetched and refreshed"), "{out}");
}

#[test]
fn ci_deploy_credential_dies_with_the_job() {
    let out = run("ci_deploy");
    assert!(out.contains("credential active"), "{out}");
    assert!(out.contains("now refused (active: false)"), "{out}");
    assert!(out.contains("refs/heads/feature is denied"), "{out}");
}

#[test]
fn admin_revoke_reaches_every_relying_party() {
    let out = run("admin_revoke");
    assert!(out.contains("with 2 credential(s)"), "{out}");
    assert!(out.contains("JWT-SVID active = false"), "{out}");
    assert!(out.contains("is listed"), "{out}");
}
