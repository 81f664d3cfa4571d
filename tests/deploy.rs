//! The deploy kit is real: every Kubernetes manifest and workflow parses as YAML, the broker
//! configs and policies embedded in ConfigMaps validate, the Deployment runs several replicas on
//! PostgreSQL, the DaemonSet serves the Workload API on a hostPath, the GitHub workflow uses
//! `ephemera run` with an ID token, the image runs as non-root and the systemd unit is
//! sandboxed. (TOML configs and policy directories under deploy/ are checked in tests/cli.rs.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_ephemera");

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files_with(ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![deploy()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| ext.iter().any(|x| e == *x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Validates a ConfigMap's embedded `ephemera.toml` and `*.cedar` entries.
fn check_config_map(path: &Path, cm: &Yaml) -> ephemera::config::Config {
    let data = &cm["data"];
    let toml = data["ephemera.toml"]
        .as_str()
        .expect("ConfigMap has ephemera.toml");
    let config = ephemera::config::Config::from_toml(toml, Path::new("/"))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let policies = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (k, v) in data.as_hash().unwrap() {
        let name = k.as_str().unwrap();
        if name.ends_with(".cedar") {
            std::fs::write(policies.path().join(name), v.as_str().unwrap()).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "{}: no policy in the ConfigMap", path.display());
    let out = Command::new(BIN)
        .args(["policy", "check", "--dir"])
        .arg(policies.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    config
}

#[test]
fn kubernetes_manifests_and_workflows_parse_and_hold_what_they_promise() {
    let yamls = files_with(&["yaml", "yml"]);
    assert!(yamls.len() >= 3, "{yamls:?}");
    let (mut deployment, mut daemonset, mut workflow) = (None, None, false);
    let mut configs = std::collections::HashMap::new();
    for path in &yamls {
        for doc in docs(path) {
            if doc.is_null() {
                continue;
            }
            match doc["kind"].as_str() {
                Some("ConfigMap") if !doc["data"]["ephemera.toml"].is_badvalue() => {
                    let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                    configs.insert(name, check_config_map(path, &doc));
                }
                Some("Deployment") => deployment = Some(doc.clone()),
                Some("DaemonSet") => daemonset = Some(doc.clone()),
                Some(_) => {}
                None => {
                    // A GitHub Actions workflow.
                    assert!(
                        !doc["jobs"].is_badvalue(),
                        "{}: not a workflow",
                        path.display()
                    );
                    assert_eq!(
                        doc["permissions"]["id-token"].as_str(),
                        Some("write"),
                        "{}",
                        path.display()
                    );
                    let text = std::fs::read_to_string(path).unwrap();
                    assert!(text.contains("ephemera run"), "{}", path.display());
                    workflow = true;
                }
            }
        }
    }
    assert!(workflow, "a GitHub Actions workflow using ephemera run");

    let deployment = deployment.expect("a Deployment");
    assert!(deployment["spec"]["replicas"].as_i64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let cm = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .unwrap();
    assert!(
        matches!(
            configs[cm].store,
            ephemera::config::StoreConfig::Postgres(_)
        ),
        "the replicas share PostgreSQL"
    );

    let daemonset = daemonset.expect("a DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let cm = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .unwrap();
    let socket = configs[cm]
        .workload_socket
        .clone()
        .expect("Workload API on");
    let host_dir = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find_map(|v| v["hostPath"]["path"].as_str())
        .expect("a hostPath volume");
    let mounted = pod["containers"][0]["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|m| {
            socket.starts_with(m["mountPath"].as_str().unwrap())
                && m["mountPath"].as_str() == Some(host_dir)
        });
    assert!(mounted, "the Workload API socket is on the hostPath");
}

#[test]
fn the_image_runs_as_non_root_and_the_unit_is_sandboxed() {
    let dockerfile = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    let stages =
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM "));
    assert!(stages >= 2, "multi-stage build");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the final stage sets USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );

    // The image's own config is made for a container: reachable through published ports, and
    // no identity from Unix peer credentials (they name users inside the container only).
    assert!(dockerfile.contains("COPY deploy/docker/ephemera.toml /etc/ephemera/ephemera.toml"));
    let config = ephemera::config::Config::load(&deploy().join("docker/ephemera.toml")).unwrap();
    assert!(
        config.grpc.listen.ip().is_unspecified(),
        "{}",
        config.grpc.listen
    );
    let text = std::fs::read_to_string(deploy().join("docker/ephemera.toml")).unwrap();
    assert!(!text.contains("attestor = \"unix\""));
    assert!(text.contains("listen = \"0.0.0.0:8080\""));

    let unit = std::fs::read_to_string(deploy().join("systemd/ephemera.service")).unwrap();
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=ephemera",
        "RuntimeDirectory=ephemera",
        "RuntimeDirectoryMode=0755",
        "User=ephemera",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    // The unit runs the config the single-node example provides, and its sockets are where
    // the unit's RuntimeDirectory puts them.
    let config =
        ephemera::config::Config::load(&deploy().join("examples/single-node/ephemera.toml"))
            .unwrap();
    assert!(config.grpc.socket.starts_with("/run/ephemera"));
    assert!(config.workload_socket.unwrap().starts_with("/run/ephemera"));
}
