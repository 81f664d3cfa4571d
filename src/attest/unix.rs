//! The `unix` attestor: identifies the process on the other end of the broker's Unix socket from
//! its kernel-reported credentials (`SO_PEERCRED`) and `/proc`.
//!
//! Claims: `uid`, `gid`, `pid`, and when `/proc/<pid>/exe` is readable, `exe_path` and
//! `exe_sha256`. Executable hashes are cached by (device, inode, size, mtime) so a busy workload
//! does not cost one file hash per request. The pid is read at request time; a process that
//! exits and whose pid is reused between connect and request is the known limit of pid-based
//! attestation, as for every peer-credential attestor.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};

use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence, UnixPeer};

/// The attestor's name in mapping rules.
pub const NAME: &str = "unix";

/// Most cached executable hashes; the cache is cleared when it fills.
const HASH_CACHE_LIMIT: usize = 1024;

/// Identity of an executable file's content at one moment.
type FileKey = (u64, u64, u64, i64, i64);

/// The `unix` attestor.
#[derive(Default, Clone)]
pub struct UnixAttestor {
    hashes: Arc<Mutex<HashMap<FileKey, String>>>,
}

impl UnixAttestor {
    /// A new attestor with an empty hash cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The peer's executable: its path and the key its hash is cached under. Only `/proc` is
    /// read (memory, not disk), so this runs on the request's own thread.
    fn exe(pid: i32) -> Result<(PathBuf, String, FileKey), String> {
        let link = PathBuf::from(format!("/proc/{pid}/exe"));
        let path = std::fs::read_link(&link).map_err(|e| e.to_string())?;
        let key = file_key(&std::fs::metadata(&link).map_err(|e| e.to_string())?);
        Ok((link, path.to_string_lossy().into_owned(), key))
    }

    fn cached_hash(&self, key: &FileKey) -> Option<String> {
        self.hashes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Hashes an executable not seen before (blocking: it reads the whole file) and caches it
    /// under the key of the file it read.
    fn hash(&self, link: &std::path::Path) -> Result<String, String> {
        let mut file = std::fs::File::open(link).map_err(|e| e.to_string())?;
        let key = file_key(&file.metadata().map_err(|e| e.to_string())?);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let h = hex(ctx.finish().as_ref());
        let mut cache = self.hashes.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= HASH_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, h.clone());
        Ok(h)
    }

    /// `exe_path` and `exe_sha256` of process `pid`, or why they cannot be read.
    async fn exe_claims(&self, pid: i32) -> Result<Result<(String, String), String>, AttestError> {
        let (link, path, key) = match Self::exe(pid) {
            Ok(exe) => exe,
            Err(reason) => return Ok(Err(reason)),
        };
        if let Some(hash) = self.cached_hash(&key) {
            return Ok(Ok((path, hash)));
        }
        let this = self.clone();
        let hash = tokio::task::spawn_blocking(move || this.hash(&link))
            .await
            .map_err(|e| AttestError::PeerUnreadable {
                pid,
                reason: e.to_string(),
            })?;
        Ok(hash.map(|h| (path, h)))
    }
}

/// What identifies a file's content at one moment.
fn file_key(meta: &std::fs::Metadata) -> FileKey {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl Attestor for UnixAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(
        &'a self,
        evidence: &'a Evidence,
    ) -> BoxFuture<'a, Result<Option<AttestedIdentity>, AttestError>> {
        Box::pin(async move {
            let Some(UnixPeer { uid, gid, pid }) = evidence.unix_peer else {
                return Ok(None);
            };
            let mut claims = Map::new();
            claims.insert("uid".into(), Value::from(uid));
            claims.insert("gid".into(), Value::from(gid));
            if let Some(pid) = pid {
                claims.insert("pid".into(), Value::from(pid));
                match self.exe_claims(pid).await? {
                    Ok((path, sha256)) => {
                        claims.insert("exe_path".into(), Value::from(path));
                        claims.insert("exe_sha256".into(), Value::from(sha256));
                    }
                    // Without the executable the identity is still uid/gid based; rules that
                    // require exe claims simply do not match.
                    Err(reason) => tracing::debug!(pid, %reason, "peer executable not readable"),
                }
            }
            Ok(Some(AttestedIdentity {
                attestor: NAME,
                subject: format!("uid:{uid}"),
                claims,
                issued_at: None,
                expires_at: None,
                single_use: None,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attests_own_process_with_executable_hash() {
        let me = std::process::id() as i32;
        let evidence = Evidence {
            unix_peer: Some(UnixPeer {
                uid: 1000,
                gid: 100,
                pid: Some(me),
            }),
            ..Evidence::default()
        };
        let a = UnixAttestor::new();
        let id = a.attest(&evidence).await.unwrap().unwrap();
        assert_eq!(id.attestor, "unix");
        assert_eq!(id.subject, "uid:1000");
        assert_eq!(id.claims["uid"], 1000);
        assert_eq!(id.claims["pid"], me);
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&exe).unwrap();
        let want = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        assert_eq!(id.claims["exe_sha256"], want.as_str());
        assert_eq!(id.claims["exe_path"], exe.to_string_lossy().as_ref());
        // Second time comes from the cache and agrees.
        let again = a.attest(&evidence).await.unwrap().unwrap();
        assert_eq!(again.claims["exe_sha256"], want.as_str());
    }

    #[tokio::test]
    async fn no_peer_means_no_opinion() {
        let a = UnixAttestor::new();
        assert!(a.attest(&Evidence::default()).await.unwrap().is_none());
    }
}
