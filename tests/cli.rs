//! The `ephemera` binary as a user runs it: the README tour against `ephemera dev`, config and
//! key-file errors with their exit status, and clean shutdown on SIGTERM.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("EPHEMERA_ADDR")
        .env_remove("EPHEMERA_DATA_DIR")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ephemera ca init` for example.org in `data`, with a policy permitting everything.
fn init_data_dir(data: &Path, cwd: &Path) {
    let out = run(
        &[
            "ca",
            "init",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ],
        cwd,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::create_dir_all(data.join("policies")).unwrap();
    std::fs::write(
        data.join("policies/all.cedar"),
        "permit (principal, action, resource);\n",
    )
    .unwrap();
}

/// Waits (bounded) for a file to appear; the broker writes endpoints.json once it serves.
fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("broker exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn dev_tour_token_svid_and_clean_shutdown() {
    let work = tempfile::tempdir().unwrap();
    let mut dev = Command::new(BIN)
        .args([
            "dev",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .current_dir(work.path())
        .env_remove("EPHEMERA_DATA_DIR")
        .env_remove("EPHEMERA_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.path().join("dev.log")).unwrap())
        .spawn()
        .unwrap();
    let data = work.path().join(".ephemera");
    wait_for(&data.join("endpoints.json"), &mut dev);
    let endpoints: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    for key in [
        "trust_domain",
        "grpc_addr",
        "http_addr",
        "broker_socket",
        "admin_token_file",
    ] {
        assert!(endpoints[key].is_string(), "endpoints.json has {key}");
    }
    assert_eq!(endpoints["trust_domain"], "dev.local");
    // A second dev broker on the same ports says which broker holds them.
    let grpc_addr = endpoints["grpc_addr"].as_str().unwrap();
    let out = run(
        &[
            "dev",
            "--grpc-addr",
            grpc_addr.trim_start_matches("https://"),
            "--http-addr",
            "127.0.0.1:0",
        ],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("another `ephemera dev` broker is already running"),
        "{err}"
    );
    assert!(err.contains(".ephemera"), "{err}");
    for key in ["root-ca.key", "intermediate-ca.key", "jwt-signing.key"] {
        let mode = std::fs::metadata(data.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    // `ephemera token --audience demo` prints one JWT-SVID for this user, verifiable via /keys.
    let out = run(&["token", "--audience", "demo"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    let http = endpoints["http_addr"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, jwks) = rt.block_on(http_get(&http, "/keys"));
    let (_, claims) = verify_jwt(&token, &serde_json::from_str(&jwks).unwrap());
    assert_eq!(
        claims["sub"],
        format!("spiffe://dev.local/uid/{}", my_uid())
    );
    assert_eq!(claims["aud"], "demo");

    // `ephemera svid --out svid` writes a verifiable chain, a 0600 key and the bundle.
    let out = run(&["svid", "--out", "svid"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("spiffe://dev.local/uid/"));
    let svid = work.path().join("svid");
    let key_mode = std::fs::metadata(svid.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let chain: Vec<Vec<u8>> = pem::parse_many(std::fs::read(svid.join("svid.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    let roots: Vec<Vec<u8>> = pem::parse_many(std::fs::read(svid.join("bundle.pem")).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert_eq!(chain.len(), 2);
    verify_chain(&chain, &roots, std::time::SystemTime::now());
    // The key on disk is the certificate's key.
    let key_pem = std::fs::read_to_string(svid.join("svid.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // The same with `openssl verify`, as the README shows, where openssl is installed.
    if let Ok(o) = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "svid/bundle.pem",
            "-untrusted",
            "svid/svid.pem",
            "svid/svid.pem",
        ])
        .current_dir(work.path())
        .output()
    {
        assert!(o.status.success(), "openssl verify: {}", text(&o.stdout));
        assert_eq!(text(&o.stdout).trim(), "svid/svid.pem: OK");
    }

    // An admin revokes the token from the CLI; introspection then says inactive.
    let (_, live) = rt.block_on(http_post_form(
        &http,
        "/introspect",
        &format!("token={token}"),
    ));
    assert!(live.contains("\"active\":true"), "{live}");
    let out = run(&["admin", "leases", "list", "--json"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jti = claims["jti"].as_str().unwrap();
    assert!(
        text(&out.stdout).lines().any(|l| l.contains(jti)),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["admin", "revoke", "lease", jti], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("lease {jti}: revoked"));
    let (_, dead) = rt.block_on(http_post_form(
        &http,
        "/introspect",
        &format!("token={token}"),
    ));
    assert_eq!(dead, r#"{"active":false}"#);
    let out = run(&["admin", "revoke", "lease", jti], work.path());
    assert!(
        text(&out.stdout).contains("nothing to revoke"),
        "{}",
        text(&out.stdout)
    );
    // Machine output: one JSON object per line, RFC 3339 times, every shown state a filter.
    let out = run(&["admin", "revoke", "lease", jti, "--json"], work.path());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (doc["lease"].as_str(), doc["revoked"].as_bool()),
        (Some(jti), Some(false))
    );
    let out = run(
        &["admin", "leases", "list", "--state", "revoked", "--json"],
        work.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], jti);
    assert_eq!(rows[0]["state"], "revoked");
    for key in ["issued_at", "expires_at", "revoked_at"] {
        let t = rows[0][key].as_str().unwrap();
        assert!(t.len() == 20 && t.ends_with('Z'), "{key}: {t}");
    }
    let out = run(&["admin", "leases", "list", "--state", "gone"], work.path());
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("task_revoked"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["svid", "--out", "svid2", "--json"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(doc["key"].as_str().unwrap().ends_with("svid2/svid.key"));
    let out = run(&["admin", "tasks", "list"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("TASK"),
        "{}",
        text(&out.stdout)
    );
    // With a wrong admin token, the Admin API refuses (exit 77); an empty token file is a
    // usage error caught before any call (exit 64).
    let wrong = work.path().join("wrong.token");
    std::fs::write(&wrong, "eat_not-the-token-of-this-broker-at-all\n").unwrap();
    let out = run(
        &[
            "admin",
            "tasks",
            "list",
            "--admin-token-file",
            wrong.to_str().unwrap(),
        ],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let out = run(
        &["admin", "tasks", "list", "--admin-token-file", "/dev/null"],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("/dev/null is empty"),
        "{}",
        text(&out.stderr)
    );

    // SIGTERM: clean exit, socket and endpoints.json removed, keys kept.
    sigterm(&dev);
    let status = dev.wait().unwrap();
    assert!(status.success(), "dev exited {status}");
    assert!(!data.join("broker.sock").exists());
    assert!(!data.join("endpoints.json").exists());
    assert!(data.join("intermediate-ca.key").exists());
    // Its log, written to a file, is plain text: the audit lines are there, escape codes are not.
    let log = std::fs::read_to_string(work.path().join("dev.log")).unwrap();
    assert!(log.contains("ephemera::audit"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );

    // With no broker, the client says what to do and exits 69.
    let out = run(&["token", "--audience", "demo"], work.path());
    assert_eq!(out.status.code(), Some(69));
    assert!(
        text(&out.stderr).contains("ephemera dev"),
        "{}",
        text(&out.stderr)
    );

    // A second start reuses the same CA.
    let root_before = std::fs::read(data.join("root-ca.pem")).unwrap();
    let mut dev = Command::new(BIN)
        .args([
            "dev",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .current_dir(work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&data.join("endpoints.json"), &mut dev);
    assert_eq!(
        std::fs::read(data.join("root-ca.pem")).unwrap(),
        root_before
    );
    let out = run(&["token", "--audience", "demo", "--ttl", "0s"], work.path());
    assert_eq!(out.status.code(), Some(64), "bad input exits 64");

    // The tour's policy example, as pasted: the reload returns once the policy serves.
    std::fs::write(
        data.join("policies/dev.cedar"),
        "@id(\"short-tokens-only\")\npermit (principal, action == Ephemera::Action::\"MintJwtSvid\", resource)\nwhen { context.requested_ttl_secs <= 300 };\n",
    )
    .unwrap();
    let out = run(&["admin", "policy", "reload"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("policies reloaded: 1 serving; decided again:"),
        "{}",
        text(&out.stdout)
    );
    let out = run(
        &["token", "--audience", "demo", "--ttl", "10m"],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let out = run(&["token", "--audience", "demo", "--ttl", "5m"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    sigterm(&dev);
    assert!(dev.wait().unwrap().success());
}

#[test]
fn serve_rejects_bad_config_with_every_problem_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ephemera.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"Bad Domain\"\ndata_dir = \"d\"\ncolour = 1\n[jwt_svid]\nmax_ttl = \"soon\"\n",
    )
    .unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    for key in ["colour: unknown key", "trust_domain:", "jwt_svid.max_ttl:"] {
        assert!(err.contains(key), "missing {key:?} in:\n{err}");
    }
    let out = run(
        &["config", "check", "--config", cfg.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn serve_refuses_a_group_readable_key_naming_file_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = run(
        &[
            "ca",
            "init",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            TD,
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = data.join("intermediate-ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("ephemera.toml");
    std::fs::write(&cfg, config_text(&data, "")).unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("chmod 600"), "{err}");

    // ca init never overwrites an existing CA.
    let out = run(
        &[
            "ca",
            "init",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            TD,
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("already exists"));
}

#[test]
fn every_deploy_config_parses_and_every_policy_validates() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut configs = Vec::new();
    let mut policy_dirs = Vec::new();
    let mut stack = vec![deploy];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                if p.file_name().unwrap() == "policies" {
                    policy_dirs.push(p.clone());
                }
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "toml") {
                configs.push(p);
            }
        }
    }
    assert!(configs.len() >= 4, "{configs:?}");
    assert!(policy_dirs.len() >= 3, "{policy_dirs:?}");
    for c in configs {
        if c.parent().is_some_and(|d| d.ends_with("examples/dev")) {
            // A layer for `ephemera dev --config`, not a whole config: it must layer cleanly
            // onto the dev defaults.
            let layer = ephemera::dev::layer(&c).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
            let opts = ephemera::dev::DevOptions {
                extra_config: layer,
                ..ephemera::dev::DevOptions::embedded(Path::new("/tmp/ephemera-layer-check"))
            };
            ephemera::config::Config::from_toml(&opts.config_text(1000), Path::new("/"))
                .unwrap_or_else(|e| panic!("{} layered onto dev: {e}", c.display()));
            continue;
        }
        ephemera::config::Config::load(&c).unwrap_or_else(|e| panic!("{}: {e}", c.display()));
    }
    for d in policy_dirs {
        let out = run(
            &["policy", "check", "--dir", d.to_str().unwrap()],
            Path::new("/"),
        );
        assert!(
            out.status.success(),
            "{}: {}",
            d.display(),
            text(&out.stderr)
        );
    }
}

#[test]
fn example_config_in_deploy_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ephemera.example.toml");
    let config = ephemera::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.trust_domain.as_str(), "example.org");
    assert!(!config.mappings.is_empty());
    // The file is valid, but the data directory it names has no CA here: `config check`
    // reports what `serve` would refuse, with the fix.
    let out = run(
        &["config", "check", "--config", path.to_str().unwrap()],
        Path::new("/"),
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("CA in /var/lib/ephemera"), "{err}");
    assert!(
        err.contains("ephemera ca init --data-dir /var/lib/ephemera"),
        "{err}"
    );
}

#[test]
fn config_check_runs_what_serve_checks_before_it_binds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let write_config = |td: &str| {
        let cfg = dir.path().join("ephemera.toml");
        std::fs::write(
            &cfg,
            format!(
                "trust_domain = \"{td}\"\ndata_dir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
                data.display()
            ),
        )
        .unwrap();
        cfg
    };
    let cfg = write_config("example.org");
    let check = |cfg: &Path| {
        run(
            &["config", "check", "--config", cfg.to_str().unwrap()],
            dir.path(),
        )
    };
    // No CA, no policies: both reported at once.
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(err.contains("ephemera ca init"), "{err}");
    assert!(err.contains("policy:"), "{err}");

    init_data_dir(&data, dir.path());
    // `ca status` lists the keys, checked against the certificate itself.
    let out = run(
        &[
            "ca",
            "status",
            "--files",
            "--json",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let keys: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = keys.iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["x509-root", "x509-intermediate", "jwt"]);
    let pem = std::fs::read(data.join("intermediate-ca.pem")).unwrap();
    let der = pem::parse(pem).unwrap().into_contents();
    let (_, inter) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(keys[1]["id"], hex(inter.raw_serial()));
    assert_eq!(keys[1]["state"], "active");
    let days = keys[1]["days_left"].as_i64().unwrap();
    assert!((364..=365).contains(&days), "{days}");
    assert_eq!(
        keys[0]["key_in_data_dir"], true,
        "ca init leaves the root key here"
    );
    assert_eq!(keys[2]["not_after"], serde_json::Value::Null);
    let out = run(
        &[
            "ca",
            "status",
            "--files",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        text(&out.stdout).contains("move it offline"),
        "{}",
        text(&out.stdout)
    );
    let out = check(&cfg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(": ok (trust domain example.org"),
        "{}",
        text(&out.stdout)
    );
    let out = run(
        &[
            "config",
            "check",
            "--connect",
            "--config",
            cfg.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("store reachable"));

    // A CA of another trust domain, and a key readable by others.
    let cfg = write_config("other.org");
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("example.org"),
        "{}",
        text(&out.stderr)
    );
    let cfg = write_config("example.org");
    std::fs::set_permissions(
        data.join("jwt-signing.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("jwt-signing.key"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version_completions_closed_pipes_and_policy_checks_that_check() {
    let work = tempfile::tempdir().unwrap();
    // --version names the commit and the build date.
    let out = run(&["--version"], work.path());
    assert!(out.status.success());
    let version = text(&out.stdout);
    assert!(
        version.starts_with(&format!("ephemera {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains(", built 20"), "{version}");

    // Completion scripts for the usual shells.
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell], work.path());
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("lock"), "{shell}");
    }

    // A reader that goes away (`| head`) ends the command quietly, with status 0.
    let mut child = Command::new(BIN)
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("Broken pipe"),
        "{}",
        text(&out.stderr)
    );

    // `policy check` fails on a missing directory (its OS error said once) and on one without
    // policies, unless empty is allowed.
    let out = run(
        &["policy", "check", "--dir", "/nonexistent/policies"],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/policies"), "{err}");
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(
        &["policy", "check", "--dir", empty.to_str().unwrap()],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("no policies"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &[
            "policy",
            "check",
            "--allow-empty",
            "--dir",
            empty.to_str().unwrap(),
        ],
        work.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let check_json = || {
        run(
            &[
                "policy",
                "check",
                "--json",
                "--dir",
                empty.to_str().unwrap(),
            ],
            work.path(),
        )
    };
    std::fs::write(
        empty.join("p.cedar"),
        "permit (principal, action, resource);\n",
    )
    .unwrap();
    let out = check_json();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["policies"], 1);
    std::fs::write(
        empty.join("bad.cedar"),
        "permit (principal, action, resource)\n",
    )
    .unwrap();
    let out = check_json();
    assert_eq!(out.status.code(), Some(64));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert!(
        doc["problems"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("bad.cedar"),
        "{doc}"
    );
}

#[test]
fn connection_errors_say_what_happened_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    init_data_dir(&data, dir.path());
    let cfg = dir.path().join("ephemera.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n\
             server_names = [\"broker.internal\"]\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{{trust_domain}}/me\"\n",
            data.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&data.join("endpoints.json"), &mut broker);
    // `ca init` left the root key in the data directory: serve says to move it.
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("the root CA key is in the data directory"),
        "{log}"
    );
    let endpoints: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap();
    let grpc = endpoints["grpc_addr"].as_str().unwrap().to_owned();
    let port = grpc.rsplit_once(':').unwrap().1.to_owned();
    let bundle = data.join("bundle.pem");

    // A name the certificate does not hold: a TLS failure, naming the names it holds.
    let out = run(
        &[
            "token",
            "--audience",
            "a",
            "--addr",
            &format!("https://127.0.0.1:{port}"),
            "--ca-file",
            bundle.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("TLS with https://127.0.0.1:"), "{err}");
    assert!(err.contains("certificate is for broker.internal"), "{err}");
    assert!(!err.contains("no broker at"), "{err}");

    // Trust anchors of another CA: a TLS failure naming the bundle used and --ca-file.
    let other = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "ca",
            "init",
            "--data-dir",
            other.path().to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    let other_bundle = other.path().join("bundle.pem");
    let out = run(
        &[
            "token",
            "--audience",
            "a",
            "--addr",
            &format!("https://broker.internal:{port}"),
            "--ca-file",
            other_bundle.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = text(&out.stderr);
    // broker.internal does not resolve here: either way the message is not empty and says
    // what was tried.
    assert!(!err.trim().is_empty());
    let out = run(
        &[
            "token",
            "--audience",
            "a",
            "--addr",
            &grpc,
            "--ca-file",
            other_bundle.to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = text(&out.stderr);
    assert!(err.contains("TLS with"), "{err}");
    assert!(err.contains(other_bundle.to_str().unwrap()), "{err}");
    assert!(err.contains("--ca-file"), "{err}");

    // Plaintext to the TLS port: says to use https.
    let out = run(
        &[
            "token",
            "--audience",
            "a",
            "--addr",
            &format!("http://127.0.0.1:{port}"),
        ],
        dir.path(),
    );
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("https://"), "{err}");

    // The workload socket asked for a broker call: says which socket to use.
    let workload = endpoints["workload_socket"].as_str().unwrap();
    let out = run(
        &["token", "--audience", "a", "--socket", workload],
        dir.path(),
    );
    let err = text(&out.stderr);
    assert!(err.contains("broker socket"), "{err}");
    assert!(
        !err.trim_end().ends_with(':'),
        "never an empty message: {err}"
    );
    sigterm(&broker);
    broker.wait().unwrap();
}

#[test]
fn dev_config_layers_a_join_token_mapping_onto_the_defaults() {
    let work = tempfile::tempdir().unwrap();
    let layer = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/dev/layer.toml");
    // A table dev sets itself is refused, naming it.
    let bad = work.path().join("bad.toml");
    std::fs::write(
        &bad,
        "trust_domain = \"x.org\"\n[grpc]\nlisten = \"0.0.0.0:1\"\n",
    )
    .unwrap();
    let out = run(&["dev", "--config", bad.to_str().unwrap()], work.path());
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains("`grpc`, `trust_domain` are set by dev"),
        "{err}"
    );

    let mut dev = Command::new(BIN)
        .args([
            "dev",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&layer)
        .current_dir(work.path())
        .env_remove("EPHEMERA_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&work.path().join(".ephemera/endpoints.json"), &mut dev);
    // The docs' join-token example, against the dev broker.
    let out = run(
        &["admin", "join-token", "create", "--name", "build-box-7"],
        work.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let join = text(&out.stdout).trim().to_owned();
    let out = run(
        &[
            "token",
            "--audience",
            "demo",
            "--join-token",
            &join,
            "--json",
        ],
        work.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["spiffe_id"], "spiffe://dev.local/node/build-box-7");
    // Once only.
    let out = run(
        &["token", "--audience", "demo", "--join-token", &join],
        work.path(),
    );
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    // And the defaults still hold: this user's own identity on the socket.
    let out = run(&["token", "--audience", "demo", "--json"], work.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["spiffe_id"],
        format!("spiffe://dev.local/uid/{}", my_uid())
    );
    sigterm(&dev);
    assert!(dev.wait().unwrap().success());
}

/// A broker serving `cfg` until `sigterm`; its log goes to `log`.
fn serve(cfg: &Path, data: &Path, log: &Path, cwd: &Path) -> Child {
    let _ = std::fs::remove_file(data.join("endpoints.json"));
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .current_dir(cwd)
        .env_remove("EPHEMERA_LOG")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    wait_for(&data.join("endpoints.json"), &mut child);
    child
}

fn stop(mut child: Child) {
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}

/// `ephemera ca status --json`: the keys by state, as (kind, state, id).
fn key_states(data: &Path, cwd: &Path) -> Vec<(String, String, String)> {
    let out = run(
        &[
            "ca",
            "status",
            "--json",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        cwd,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut keys: Vec<(String, String, String)> = text(&out.stdout)
        .lines()
        .map(|l| {
            let k: serde_json::Value = serde_json::from_str(l).unwrap();
            let s = |f: &str| k[f].as_str().unwrap().to_owned();
            (s("kind"), s("state"), s("id"))
        })
        .collect();
    keys.sort();
    keys
}

/// The root offline, through the binary: the broker prepares a CSR and warns; the CSR is
/// signed on "the root's machine" and staged; a new root is made there and staged, published
/// before anything chains to it, and an intermediate it signs waits for it. Every pending and
/// prepared state survives a restart.
#[test]
fn offline_root_stages_intermediates_and_a_new_root_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let data = cwd.join("data");
    init_data_dir(&data, cwd);
    // The root key leaves the broker's machine.
    let machine = cwd.join("root-machine");
    std::fs::create_dir(&machine).unwrap();
    for f in ["root-ca.pem", "root-ca.key"] {
        std::fs::copy(data.join(f), machine.join(f)).unwrap();
    }
    std::fs::remove_file(data.join("root-ca.key")).unwrap();
    let cfg = cwd.join("ephemera.toml");
    std::fs::write(&cfg, config_text(&data, "")).unwrap();
    let log = cwd.join("serve.log");
    let d = data.to_str().unwrap();
    let ca = |args: &[&str]| {
        let mut all = vec!["ca"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", d]);
        run(&all, cwd)
    };
    let broker = serve(&cfg, &data, &log, cwd);

    // With the root offline the broker cannot rotate the intermediate itself.
    let out = ca(&["rotate", "--x509"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("ephemera ca csr"));
    let out = ca(&["rotate", "--root"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("ephemera ca new-root"));

    // A CSR is prepared; the broker says an intermediate waits for the root.
    let out = ca(&["csr", "--out", "next.csr"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = key_states(&data, cwd);
    let pending = before
        .iter()
        .find(|k| k.1 == "pending")
        .expect("a pending intermediate")
        .2
        .clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoints = |data: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(data.join("endpoints.json")).unwrap()).unwrap()
    };
    let http = endpoints(&data)["http_addr"].as_str().unwrap().to_owned();
    let (status, ready) = rt.block_on(http_get(&http, "/readyz"));
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("waits for the offline root"), "{ready}");

    // Restart while pending: the same key still waits, and the warning is logged.
    stop(broker);
    let broker = serve(&cfg, &data, &log, cwd);
    assert_eq!(key_states(&data, cwd), before);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("waiting for the offline root"), "{logged}");

    // Signed on the root's machine, staged.
    let out = run(
        &[
            "ca",
            "sign-intermediate",
            "--root-dir",
            machine.to_str().unwrap(),
            "--csr",
            "next.csr",
            "--out",
            "next.pem",
        ],
        cwd,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ca(&["stage", "next.pem"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&pending),
        "{}",
        text(&out.stdout)
    );
    // Staging it again is refused as not pending.
    let out = ca(&["stage", "next.pem"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));

    // Restart while prepared; then force it in.
    stop(broker);
    let broker = serve(&cfg, &data, &log, cwd);
    let states = key_states(&data, cwd);
    assert!(states.contains(&(
        "x509-intermediate".into(),
        "prepared".into(),
        pending.clone()
    )));
    let out = ca(&["rotate", "--x509", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (k["id"].as_str(), k["state"].as_str()),
        (Some(pending.as_str()), Some("active"))
    );

    // A new root, made on the root's machine and staged: published, not yet used.
    let machine2 = cwd.join("root-machine-2");
    let out = run(
        &[
            "ca",
            "new-root",
            "--root-dir",
            machine2.to_str().unwrap(),
            "--trust-domain",
            TD,
            "--out",
            "root2.pem",
        ],
        cwd,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ca(&["stage", "root2.pem"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("x509-root"),
        "{}",
        text(&out.stdout)
    );
    let http = endpoints(&data)["http_addr"].as_str().unwrap().to_owned();
    let (_, bundle) = rt.block_on(http_get(&http, "/bundle"));
    let bundle: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    let x509_keys = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .count();
    assert_eq!(x509_keys, 2, "both roots are in the bundle");

    // An intermediate under the new root waits for it (two refresh hints), across a restart.
    let out = ca(&["csr", "--out", "next2.csr"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(
        &[
            "ca",
            "sign-intermediate",
            "--root-dir",
            machine2.to_str().unwrap(),
            "--csr",
            "next2.csr",
            "--out",
            "next2.pem",
        ],
        cwd,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ca(&["stage", "next2.pem"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    stop(broker);
    let broker = serve(&cfg, &data, &log, cwd);
    let out = ca(&["rotate", "--x509", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["state"], "prepared", "it waits for its root: {k}");
    let states = key_states(&data, cwd);
    let roots: Vec<&str> = states
        .iter()
        .filter(|k| k.0 == "x509-root")
        .map(|k| k.1.as_str())
        .collect();
    assert_eq!(roots.len(), 2, "{states:?}");
    assert!(roots.contains(&"prepared") && roots.contains(&"active"));
    stop(broker);
}
