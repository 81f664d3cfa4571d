//! `endpoints.json`: where a running broker can be reached, written into its data directory so
//! local clients find it without flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the data directory.
pub use crate::datadir::ENDPOINTS as FILE;

/// Machine-readable addresses of everything a running broker serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// The trust domain.
    pub trust_domain: String,
    /// gRPC over TCP, as a URL (`https://127.0.0.1:8443`, or `http://` when plaintext).
    pub grpc_addr: String,
    /// HTTP base URL (bundle, keys, discovery, health).
    pub http_addr: String,
    /// gRPC Unix socket path.
    pub broker_socket: PathBuf,
    /// PEM trust anchors for verifying the broker's TLS certificate and every SVID.
    pub ca_bundle: PathBuf,
    /// The SPIFFE Workload API socket (absent when disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_socket: Option<PathBuf>,
    /// The admin token file, for `ephemera admin` (absent when the Admin API is disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
}

impl Endpoints {
    /// Writes `dir/endpoints.json` atomically (temp file + rename).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, dir.join(FILE))
    }

    /// Reads `dir/endpoints.json`.
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read(dir.join(FILE))?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }
}
