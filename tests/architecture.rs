//! The dependency rules of `ARCHITECTURE.md`, checked by reading `src/`: dependencies point
//! down only. A file that breaks a rule fails this test with the file, the line and the rule.
//!
//! ```text
//!  cli / app / dev / config        wiring and the command line
//!  api / http                      protocols: translate and call the broker core
//!  broker                          the request flow, tasks, revocation, sessions
//!  attest  policy  ca  lease       the parts
//!  store                           durable state
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};

/// A module (a file `src/<name>.rs` or a folder `src/<name>/`) and what it must never use:
/// everything in [`ABOVE`] unless `config` says otherwise, and `also`.
struct Rule {
    module: &'static str,
    above: bool,
    also: &'static [&'static str],
    why: &'static str,
}

/// What no part below the transports uses: protocol crates and the layers that wire and serve.
const ABOVE: &[&str] = &[
    "tonic::",
    "axum::",
    "hyper::",
    "crate::api",
    "crate::http::",
    "crate::cli",
    "crate::app",
    "crate::dev",
    "crate::client",
    "crate::config",
];

const RULES: &[Rule] = &[
    Rule {
        module: "broker",
        above: true,
        also: &[],
        why: "the broker core knows no protocol and no config file: api/ and http.rs translate into it, config.rs builds its settings",
    },
    Rule {
        module: "attest",
        above: true,
        also: &["crate::broker", "crate::policy", "crate::lease"],
        why: "attestors verify evidence and know nothing of tasks, policy or transports",
    },
    Rule {
        module: "policy",
        above: true,
        also: &["crate::broker", "crate::lease", "crate::store"],
        why: "policy decides from what it is given; it reads no store and knows no transport",
    },
    Rule {
        module: "ca",
        above: true,
        also: &[
            "crate::broker",
            "crate::store",
            "crate::attest",
            "crate::policy",
            "crate::lease",
        ],
        why: "the CA signs; it never touches the store and borrows nothing from attestors",
    },
    Rule {
        module: "lease",
        above: true,
        also: &["crate::broker", "crate::attest", "crate::policy"],
        why: "leases, the revocation bus and its workers sit below the broker",
    },
    Rule {
        module: "store",
        above: true,
        also: &[
            "crate::broker",
            "crate::lease",
            "crate::attest",
            "crate::policy",
            "crate::ca",
        ],
        why: "the store is the bottom layer: settings types live in it, and nothing above is imported",
    },
    Rule {
        module: "config",
        above: false,
        also: &[
            "crate::api",
            "crate::http::",
            "crate::cli",
            "crate::app",
            "crate::dev",
        ],
        why: "config.rs only parses and wires: it never reaches into the layers it configures",
    },
];

impl Rule {
    fn forbidden(&self) -> impl Iterator<Item = &'static str> + '_ {
        let above: &[&str] = if self.above { ABOVE } else { &[] };
        above.iter().chain(self.also).copied()
    }
}

/// Modules allowed to speak a protocol crate.
const TRANSPORT_MODULES: &[&str] = &["api", "http", "httpc", "app", "cli", "client", "bin"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/broker/mint.rs` → `broker`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Code lines of a file (comments dropped), numbered from 1.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

/// Every broken rule in the crate, as `file:line: what (why)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(src.parent().unwrap()).unwrap().display();
        for (n, line) in code_lines(&text) {
            for rule in RULES.iter().filter(|r| r.module == module) {
                for f in rule.forbidden() {
                    if line.contains(f) {
                        found.push(format!("{shown}:{n}: uses {f} ({})", rule.why));
                    }
                }
            }
            if !TRANSPORT_MODULES.contains(&module.as_str()) {
                for f in ["tonic::", "axum::", "hyper::"] {
                    if line.contains(f) && !RULES.iter().any(|r| r.module == module) {
                        found.push(format!(
                            "{shown}:{n}: uses {f} (protocol crates belong to api/, http.rs and the command line)"
                        ));
                    }
                }
            }
            // The data directory's file names are spelled only by `DataDir`.
            if module != "datadir" {
                for name in [
                    "\"admin.token\"",
                    "\"admin-pages.key\"",
                    "\"ephemera.db\"",
                    "\"endpoints.json\"",
                    "\"broker.sock\"",
                    "\"workload.sock\"",
                    "\"root-ca.key\"",
                    "\"intermediate-ca.key\"",
                    "\"jwt-signing.key\"",
                ] {
                    if line.contains(name) {
                        found.push(format!(
                            "{shown}:{n}: spells the data directory file {name} (ask DataDir for it)"
                        ));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn dependencies_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "the dependency rules of ARCHITECTURE.md are broken:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn a_forbidden_import_is_caught() {
    // The checker itself: a copy of src/ with one import the rules forbid fails.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let copy = std::env::temp_dir().join(format!("ephemera-arch-{}", std::process::id()));
    let copied = copy.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        let to = copied.join(f.strip_prefix(&src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, &to).unwrap();
    }
    let x509 = copied.join("ca/x509.rs");
    let text = std::fs::read_to_string(&x509).unwrap();
    std::fs::write(
        &x509,
        format!("use crate::attest::unix::UnixAttestor;\n{text}"),
    )
    .unwrap();
    let found = violations(&copied);
    std::fs::remove_dir_all(&copy).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("src/ca/x509.rs:1: uses crate::attest"),
        "{found:?}"
    );
}
