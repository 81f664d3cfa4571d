//! Embedded defaults: a broker that needs no config file, for `ephemera dev`, the examples and
//! the benchmark program.
//!
//! On first use the data directory gets a CA (root, intermediate, JWT key), an admin token and a
//! policy; later starts reuse them. The caller's own uid is mapped to
//! `spiffe://<trust domain>/uid/<uid>` on the Unix socket; more config (OIDC issuers, mappings,
//! task settings) can be appended as TOML.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;

use crate::app::{self, Running};
use crate::ca::keys::{self, InitOptions};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;

/// The policy a fresh dev data directory starts with: identity mapping already limits it to the
/// current user, so every action is permitted. Edit it to try policies; it reloads on save.
pub const DEV_POLICY: &str = r#"// Ephemera dev policy: reloaded whenever this file changes.
// Schema: `ephemera policy schema`. Deny by default: remove this and nothing is permitted.
@id("dev-allow-all")
permit (principal, action, resource);
"#;

/// What an embedded broker looks like.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Keys, sockets, the store and `endpoints.json` (created 0700).
    pub data_dir: PathBuf,
    /// Trust domain of the CA (fixed when the data directory is first created).
    pub trust_domain: String,
    /// gRPC TCP address (TLS); `127.0.0.1:0` for any free port.
    pub grpc_addr: String,
    /// HTTP address; `127.0.0.1:0` for any free port.
    pub http_addr: String,
    /// Log filter written into the config.
    pub log_level: String,
    /// The policy written when the data directory has none.
    pub policy: String,
    /// TOML appended to the generated config (e.g. `[[oidc]]` issuers and their mappings).
    pub extra_config: String,
    /// Lines added to the `[ca]` table (dev holds the root key and rotates on its own).
    pub ca_config: String,
}

impl DevOptions {
    /// An embedded broker in `data_dir` on free loopback ports, allowing everything the mapping
    /// admits.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            trust_domain: "dev.local".into(),
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            log_level: "warn".into(),
            policy: DEV_POLICY.into(),
            extra_config: String::new(),
            ca_config: String::new(),
        }
    }

    /// The config text these options produce for `uid`.
    pub fn config_text(&self, uid: u32) -> String {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        format!(
            "trust_domain = {td}\ndata_dir = {dir}\n\n[grpc]\nlisten = {grpc}\n\n[http]\nlisten = {http}\n\n\
             [log]\nlevel = {log}\n\n[ca]\nroot_key = \"online\"\n{ca}\n\n[[mapping]]\nattestor = \"unix\"\n\
             spiffe_id = \"spiffe://{{trust_domain}}/uid/{{claims.uid}}\"\nmatch = {{ uid = \"{uid}\" }}\n\n{extra}\n",
            td = q(&self.trust_domain),
            dir = q(&self.data_dir.to_string_lossy()),
            grpc = q(&self.grpc_addr),
            http = q(&self.http_addr),
            log = q(&self.log_level),
            ca = self.ca_config,
            extra = self.extra_config,
        )
    }

    /// Creates what the data directory lacks (CA, admin token, policy) and returns the config.
    pub fn prepare(&self, base_dir: &Path) -> anyhow::Result<Config> {
        let config = Config::from_toml(&self.config_text(current_uid()?), base_dir)?;
        if !keys::exists(&config.data_dir) {
            keys::init(
                &config.data_dir,
                &config.trust_domain,
                InitOptions::default(),
                SystemTime::now(),
            )?;
            tracing::info!(data_dir = %config.data_dir.display(), "created dev CA");
        }
        crate::api::admin::create_token_file(&config.admin_token_file)?;
        if !config.policy_dir.exists() {
            std::fs::create_dir_all(&config.policy_dir)
                .with_context(|| format!("creating {}", config.policy_dir.display()))?;
            std::fs::write(config.policy_dir.join("dev.cedar"), &self.policy)
                .context("writing the dev policy")?;
        }
        Ok(config)
    }

    /// Prepares and starts a broker in this process on the system clock.
    pub async fn start(&self) -> anyhow::Result<Running> {
        self.start_with_clock(Arc::new(SystemClock)).await
    }

    /// Prepares and starts a broker in this process on `clock`.
    pub async fn start_with_clock(&self, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let config = self.prepare(&cwd)?;
        Ok(app::start(config, clock).await?)
    }
}

/// What a file given to `ephemera dev --config` may set: attestors, mapping rules, policy,
/// limits and task timing. Everything else (trust domain, data directory, listeners, store,
/// logging) is the dev broker's own.
pub const LAYERABLE: &[&str] = &["oidc", "x509pop", "mapping", "policy", "limits", "tasks"];

/// Reads a file for `ephemera dev --config` and returns its text to append to the dev config,
/// refusing a table that dev sets itself. Relative paths in it are taken from its directory.
pub fn layer(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let refused: Vec<&String> = table
        .keys()
        .filter(|k| !LAYERABLE.contains(&k.as_str()))
        .collect();
    if !refused.is_empty() {
        anyhow::bail!(
            "{}: `ephemera dev --config` layers only {} onto the dev defaults; {} {} set by dev \
             (use `ephemera serve --config` for a full configuration)",
            path.display(),
            LAYERABLE.join(", "),
            refused
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if refused.len() == 1 { "is" } else { "are" }
        );
    }
    // Relative file paths in the layer are relative to the layer, not to where dev runs.
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let absolute = |v: &mut toml::Value| {
        if let toml::Value::String(s) = v
            && !s.is_empty()
            && Path::new(s.as_str()).is_relative()
        {
            *s = base.join(s.as_str()).to_string_lossy().into_owned();
        }
    };
    if let Some(toml::Value::Table(policy)) = table.get_mut("policy")
        && let Some(dir) = policy.get_mut("dir")
    {
        absolute(dir);
    }
    if let Some(toml::Value::Array(issuers)) = table.get_mut("oidc") {
        for issuer in issuers.iter_mut().filter_map(toml::Value::as_table_mut) {
            for key in ["jwks_file", "jwks_ca_file"] {
                if let Some(v) = issuer.get_mut(key) {
                    absolute(v);
                }
            }
        }
    }
    if let Some(toml::Value::Table(x509pop)) = table.get_mut("x509pop")
        && let Some(toml::Value::Array(bundles)) = x509pop.get_mut("ca_bundles")
    {
        bundles.iter_mut().for_each(absolute);
    }
    Ok(toml::to_string(&table)?)
}

/// The uid this process runs as (the owner of `/proc/self`).
pub fn current_uid() -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self")
        .context("reading /proc/self")?
        .uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_text_parses_with_awkward_paths() {
        let mut opts = DevOptions::embedded("/tmp/with \"quotes\" and spaces");
        opts.extra_config = "[tasks]\ngrace = \"5s\"\n".into();
        let config = Config::from_toml(&opts.config_text(1000), Path::new("/")).unwrap();
        assert_eq!(
            config.data_dir,
            PathBuf::from("/tmp/with \"quotes\" and spaces")
        );
        assert_eq!(config.tasks.grace, std::time::Duration::from_secs(5));
        assert_eq!(config.mappings.len(), 1);
    }
}
