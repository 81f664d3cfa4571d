//! The data directory and every file name in it. Nothing else in the crate spells a data
//! directory file name: each part asks [`DataDir`] for its path (a test reads `src/` and holds
//! this).
//!
//! ```text
//! <data dir>/
//!   root-ca.pem  root-ca.key        the root (the key may live offline after `ca init`)
//!   intermediate-ca.pem/.key        signs X.509-SVIDs
//!   jwt-signing.key                 signs JWT-SVIDs
//!   bundle.pem                      trust anchors for clients
//!   admin.token                     the Admin API's bearer token (0600)
//!   admin-pages.key                 the secret Admin API page tokens are keyed from (0600)
//!   key-wrap.key                    wraps the signing keys kept in the store (0600)
//!   ephemera.db (+ -wal, -shm)      the SQLite store
//!   policies/                       Cedar policies
//!   broker.sock  workload.sock      the Unix sockets
//!   endpoints.json                  where a running broker listens
//! ```

use std::path::{Path, PathBuf};

/// Root CA certificate (PEM).
pub const ROOT_CERT: &str = "root-ca.pem";
/// Root CA private key (PKCS#8 PEM, 0600). May be moved offline after init.
pub const ROOT_KEY: &str = "root-ca.key";
/// Intermediate CA certificate (PEM); signs every X.509-SVID.
pub const INTERMEDIATE_CERT: &str = "intermediate-ca.pem";
/// Intermediate CA private key (PKCS#8 PEM, 0600).
pub const INTERMEDIATE_KEY: &str = "intermediate-ca.key";
/// ES256 JWT-SVID signing key (PKCS#8 PEM, 0600).
pub const JWT_KEY: &str = "jwt-signing.key";
/// Public copy of the trust anchors, for clients (`--ca-file`).
pub const BUNDLE: &str = "bundle.pem";
/// The Admin API's bearer token (0600).
pub const ADMIN_TOKEN: &str = "admin.token";
/// The secret Admin API page tokens are keyed from (0600).
pub const ADMIN_PAGES_KEY: &str = "admin-pages.key";
/// The key-encryption key the signing keys in the store are wrapped with (0600).
pub const KEY_WRAP: &str = "key-wrap.key";
/// The SQLite database.
pub const DATABASE: &str = "ephemera.db";
/// Where a running broker can be reached.
pub const ENDPOINTS: &str = "endpoints.json";
/// The broker's gRPC Unix socket.
pub const BROKER_SOCKET: &str = "broker.sock";
/// The SPIFFE Workload API socket.
pub const WORKLOAD_SOCKET: &str = "workload.sock";
/// The Cedar policy directory.
pub const POLICIES: &str = "policies";

/// A broker's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    /// The data directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `root-ca.pem`.
    pub fn root_cert(&self) -> PathBuf {
        self.file(ROOT_CERT)
    }

    /// `root-ca.key`.
    pub fn root_key(&self) -> PathBuf {
        self.file(ROOT_KEY)
    }

    /// `intermediate-ca.pem`.
    pub fn intermediate_cert(&self) -> PathBuf {
        self.file(INTERMEDIATE_CERT)
    }

    /// `intermediate-ca.key`.
    pub fn intermediate_key(&self) -> PathBuf {
        self.file(INTERMEDIATE_KEY)
    }

    /// `jwt-signing.key`.
    pub fn jwt_key(&self) -> PathBuf {
        self.file(JWT_KEY)
    }

    /// `bundle.pem`.
    pub fn bundle(&self) -> PathBuf {
        self.file(BUNDLE)
    }

    /// `admin.token`.
    pub fn admin_token(&self) -> PathBuf {
        self.file(ADMIN_TOKEN)
    }

    /// `admin-pages.key`.
    pub fn admin_pages_key(&self) -> PathBuf {
        self.file(ADMIN_PAGES_KEY)
    }

    /// `key-wrap.key`.
    pub fn key_wrap(&self) -> PathBuf {
        self.file(KEY_WRAP)
    }

    /// `ephemera.db`.
    pub fn database(&self) -> PathBuf {
        self.file(DATABASE)
    }

    /// `endpoints.json`.
    pub fn endpoints(&self) -> PathBuf {
        self.file(ENDPOINTS)
    }

    /// `broker.sock`.
    pub fn broker_socket(&self) -> PathBuf {
        self.file(BROKER_SOCKET)
    }

    /// `workload.sock`.
    pub fn workload_socket(&self) -> PathBuf {
        self.file(WORKLOAD_SOCKET)
    }

    /// `policies/`.
    pub fn policies(&self) -> PathBuf {
        self.file(POLICIES)
    }
}
