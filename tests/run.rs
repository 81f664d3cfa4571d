//! `ephemera run -- CMD` against a real broker: CMD gets working credentials (and checks them
//! itself), and however CMD ends — normally, killed, crashed, or by a forwarded SIGTERM — the
//! task ends, its JWT is `active: false`, its serial is in `/crl`, the credentials directory is
//! gone and the exit status is CMD's. CMD never runs when the broker says no or is not there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::*;
use ephemera::store::TaskState;

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");
const CHILD_ENV: &str = "EPHEMERA_RUN_TEST_CHILD";

fn tasks_config() -> String {
    format!(
        "{}\n[tasks]\nheartbeat_interval = \"1s\"\ngrace = \"5s\"\n",
        uid_rule()
    )
}

/// `ephemera run --socket <broker> <flags> -- <cmd>`.
fn run_command(b: &TestBroker, flags: &[&str], cmd: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.arg("run")
        .arg("--socket")
        .arg(b.socket())
        .arg("--no-ambient")
        .arg("--credentials-parent")
        .arg(b.dir.path())
        .args(flags)
        .arg("--")
        .args(cmd)
        .env_remove("EPHEMERA_ADDR")
        .env("EPHEMERA_TEST_HTTP", &b.running.endpoints.http_addr)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// A shell command that records its credentials directory in `out`, then runs `then`.
fn shell(out: &Path, then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "printf %s \"$EPHEMERA_CREDENTIALS_DIR\" > {}; {then}",
            out.display()
        ),
    ]
}

/// The one task the broker has.
async fn only_task(b: &TestBroker) -> ephemera::store::Task {
    let filter = ephemera::store::ListFilter {
        limit: 10,
        ..Default::default()
    };
    let tasks = b
        .running
        .broker
        .store()
        .list_tasks(filter, unix_now())
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "exactly one task");
    tasks.into_iter().next().unwrap()
}

/// The task has ended and every credential it had is refused by relying parties.
async fn assert_revoked(b: &TestBroker, jwt: Option<&str>, serial: Option<&str>) {
    let task = only_task(b).await;
    assert_ne!(task.state, TaskState::Active, "the task ended");
    if let Some(jwt) = jwt {
        assert_eq!(introspect_http(b, jwt).await["active"], false);
    }
    if let Some(serial) = serial {
        crl_listing(b, serial).await;
    }
}

/// CMD of the first test: this test binary again, checking what `ephemera run` handed it.
#[test]
fn child_checks_its_credentials() {
    let Ok(out) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var("EPHEMERA_CREDENTIALS_DIR").unwrap());
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "private credentials directory");
    for f in ["svid.key", "svid.pem", "jwt-deploy.token"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // The X.509-SVID chains to bundle.pem (rustls-webpki) and matches svid.key.
    let chain: Vec<Vec<u8>> = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    let roots: Vec<Vec<u8>> = pem::parse_many(std::fs::read(dir.join("bundle.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(pem::Pem::into_contents)
        .collect();
    verify_chain(&chain, &roots, SystemTime::now());
    let key = pem::parse(std::fs::read(dir.join("svid.key")).unwrap()).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.contents(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        ring::signature::KeyPair::public_key(&pair).as_ref(),
        leaf.public_key().subject_public_key.data.as_ref(),
        "svid.key is the certificate's key"
    );
    let spiffe_id = std::env::var("EPHEMERA_SPIFFE_ID").unwrap();
    assert!(format!("{:?}", leaf.subject_alternative_name()).contains(&spiffe_id));

    // The JWT-SVID is in the file and in EPHEMERA_JWT, and its signature verifies against /keys.
    let token = std::fs::read_to_string(dir.join("jwt-deploy.token")).unwrap();
    assert_eq!(std::env::var("EPHEMERA_JWT").unwrap(), token);
    let http = std::env::var("EPHEMERA_TEST_HTTP").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, keys) = rt.block_on(http_get(&http, "/keys"));
    assert_eq!(status, 200);
    let (_, claims) = verify_jwt(&token, &serde_json::from_str(&keys).unwrap());
    assert_eq!(claims["sub"], spiffe_id.as_str());
    assert_eq!(claims["aud"], "deploy");

    let serial = leaf.raw_serial_as_string().replace(':', "").to_lowercase();
    let report = serde_json::json!({
        "dir": dir,
        "serial": serial,
        "token": token,
        "task": std::env::var("EPHEMERA_TASK_ID").unwrap(),
    });
    std::fs::write(out, report.to_string()).unwrap();
    std::process::exit(7);
}

#[tokio::test(flavor = "multi_thread")]
async fn cmd_gets_working_credentials_that_die_when_it_exits() {
    let b = start(&tasks_config()).await;
    let report = b.dir.path().join("report.json");
    let me = std::env::current_exe().unwrap();
    let status = run_command(
        &b,
        &["--x509", "--jwt-audience", "deploy", "--label", "job=42"],
        &[
            me.to_str().unwrap(),
            "--exact",
            "child_checks_its_credentials",
            "--nocapture",
        ],
    )
    .env(CHILD_ENV, &report)
    .status()
    .await
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("CMD ran and checked")).unwrap();
    assert_eq!(
        status.code(),
        Some(7),
        "ephemera run exits with CMD's status"
    );
    let dir = PathBuf::from(report["dir"].as_str().unwrap());
    assert!(!dir.exists(), "credentials directory removed");
    let task = only_task(&b).await;
    assert_eq!(task.id, report["task"].as_str().unwrap());
    assert_eq!(task.labels.get("job").map(String::as_str), Some("42"));
    assert_revoked(&b, report["token"].as_str(), report["serial"].as_str()).await;
    b.running.shutdown().await.unwrap();
}

/// Runs `sh -c <script>` under `ephemera run --jwt-audience deploy`; returns (status, dir, token).
async fn run_script(b: &TestBroker, script: &str) -> (std::process::ExitStatus, PathBuf, String) {
    let out = b.dir.path().join("dir.txt");
    let _ = std::fs::remove_file(&out);
    let script = format!(
        "cp \"$EPHEMERA_CREDENTIALS_DIR/jwt-deploy.token\" {dir}/token.txt; {script}",
        dir = b.dir.path().display()
    );
    let cmd = shell(&out, &script);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let status = run_command(b, &["--jwt-audience", "deploy"], &args)
        .status()
        .await
        .unwrap();
    let dir = PathBuf::from(std::fs::read_to_string(&out).unwrap());
    let token = std::fs::read_to_string(b.dir.path().join("token.txt")).unwrap();
    (status, dir, token)
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_or_crashed_cmd_still_ends_the_task() {
    for (script, want) in [
        ("kill -KILL $$", 137),
        ("kill -SEGV $$", 139),
        ("exit 0", 0),
    ] {
        let b = start(&tasks_config()).await;
        let (status, dir, token) = run_script(&b, script).await;
        assert_eq!(status.code(), Some(want), "{script}");
        assert!(!dir.exists(), "{script}: directory removed");
        assert_eq!(
            introspect_http(&b, &token).await["active"],
            false,
            "{script}"
        );
        assert_revoked(&b, None, None).await;
        b.running.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_reaches_cmd() {
    let b = start(&tasks_config()).await;
    let out = b.dir.path().join("dir.txt");
    let got = b.dir.path().join("got-term");
    let script = format!(
        "trap 'touch {got}; exit 42' TERM; while :; do sleep 0.05; done",
        got = got.display()
    );
    let cmd = shell(&out, &script);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut child = run_command(&b, &["--x509"], &args).spawn().unwrap();
    // Wait until CMD runs (it has written where its credentials are).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&out).map_or(true, |s| s.is_empty()) {
        assert!(tokio::time::Instant::now() < deadline, "CMD never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = PathBuf::from(std::fs::read_to_string(&out).unwrap());
    let chain = pem::parse_many(std::fs::read(dir.join("svid.pem")).unwrap()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].contents()).unwrap();
    let serial = leaf.raw_serial_as_string().replace(':', "").to_lowercase();

    send_signal(child.id().unwrap(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("ephemera run exits after SIGTERM")
        .unwrap();
    assert!(got.exists(), "CMD received SIGTERM");
    assert_eq!(status.code(), Some(42));
    assert!(!dir.exists());
    assert_revoked(&b, None, Some(&serial)).await;
    b.running.shutdown().await.unwrap();
}

fn send_signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn cmd_does_not_run_when_denied_or_unreachable() {
    let b = start_with_policy(
        &tasks_config(),
        "@id(\"no-tasks\")\nforbid (principal, action, resource);\n",
    )
    .await;
    let marker = b.dir.path().join("ran");
    let touch = ["touch".to_owned(), marker.display().to_string()];
    let args: Vec<&str> = touch.iter().map(String::as_str).collect();
    let out = run_command(&b, &["--jwt-audience", "deploy"], &args)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "denied");
    assert!(String::from_utf8_lossy(&out.stderr).contains("denied"));
    assert!(!marker.exists(), "CMD did not run");

    let out = tokio::process::Command::new(BIN)
        .args(["run", "--no-ambient", "--socket"])
        .arg(b.dir.path().join("nobody.sock"))
        .arg("--")
        .args(&args)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "unreachable");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no broker"));
    assert!(!marker.exists(), "CMD did not run");
    b.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn x509_svid_is_renewed_in_place_while_cmd_runs() {
    let b = start(&tasks_config()).await;
    let out = b.dir.path().join("dir.txt");
    let keep = b.dir.path().display().to_string();
    // Copy the first certificate, wait (bounded) until svid.pem changes, copy the renewed one.
    let script = format!(
        "cd \"$EPHEMERA_CREDENTIALS_DIR\"; cp svid.pem {keep}/first.pem; i=0; \
         while cmp -s svid.pem {keep}/first.pem && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done; \
         cp svid.pem {keep}/renewed.pem; cp svid.key {keep}/renewed.key; cp bundle.pem {keep}/bundle.pem"
    );
    let cmd = shell(&out, &script);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let status = run_command(&b, &["--x509", "--ttl", "2s"], &args)
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let read = |name: &str| -> Vec<Vec<u8>> {
        pem::parse_many(std::fs::read(b.dir.path().join(name)).unwrap())
            .unwrap()
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect()
    };
    let (first, renewed, roots) = (read("first.pem"), read("renewed.pem"), read("bundle.pem"));
    assert_ne!(first[0], renewed[0], "svid.pem was renewed while CMD ran");
    verify_chain(&renewed, &roots, SystemTime::now());
    let serial = |der: &[u8]| {
        let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
        c.raw_serial_as_string().replace(':', "").to_lowercase()
    };
    // Both generations belonged to the task and both are revoked now.
    crl_listing(&b, &serial(&first[0])).await;
    crl_listing(&b, &serial(&renewed[0])).await;
    assert_revoked(&b, None, None).await;
    b.running.shutdown().await.unwrap();
}
