//! The `unix` attestor: identifies the process on the other end of the broker's Unix socket from
//! its kernel-reported credentials (`SO_PEERCRED`) and `/proc`.
//!
//! Claims: `uid`, `gid`, `pid`, and when `/proc/<pid>/exe` is readable, `exe_path` and
//! `exe_sha256`. Executable hashes are cached by (device, inode, size, mtime) so a busy workload
//! does not cost one file hash per request, and computed once when many processes of a new
//! executable connect at the same time. The pid is read at request time; a process that
//! exits and whose pid is reused between connect and request is the known limit of pid-based
//! attestation, as for every peer-credential attestor.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};

use crate::ca::der::hex;

use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence, UnixPeer};

/// The attestor's name in mapping rules.
pub const NAME: &str = "unix";

/// Most cached executable hashes; the cache is cleared when it fills.
const HASH_CACHE_LIMIT: usize = 1024;

/// Identity of an executable file's content at one moment.
type FileKey = (u64, u64, u64, i64, i64);

/// One executable's hash, computed once: callers that miss the cache together wait for the
/// same read of the file instead of each reading it.
type HashCell = Arc<tokio::sync::OnceCell<String>>;

/// The `unix` attestor.
#[derive(Default, Clone)]
pub struct UnixAttestor {
    hashes: Arc<Mutex<HashMap<FileKey, HashCell>>>,
    /// Executables read and hashed so far.
    files_hashed: Arc<AtomicUsize>,
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

    /// The cache entry for `key`, made empty if there is none yet.
    fn cell(&self, key: FileKey) -> HashCell {
        let mut cache = self.hashes.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= HASH_CACHE_LIMIT && !cache.contains_key(&key) {
            cache.clear();
        }
        cache.entry(key).or_default().clone()
    }

    /// Hashes the executable behind `link` (blocking: it reads the whole file), provided the
    /// file opened is still the one `key` describes.
    fn hash(link: &std::path::Path, key: &FileKey) -> Result<String, String> {
        let mut file = std::fs::File::open(link).map_err(|e| e.to_string())?;
        if file_key(&file.metadata().map_err(|e| e.to_string())?) != *key {
            return Err("the executable changed while it was being read".into());
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(hex(ctx.finish().as_ref()))
    }

    /// `exe_path` and `exe_sha256` of process `pid`, or why they cannot be read. An executable
    /// not seen before is hashed once, however many of its processes ask at the same time; a
    /// failed hash is not cached, so the next request tries again.
    async fn exe_claims(&self, pid: i32) -> Result<Result<(String, String), String>, AttestError> {
        let (link, path, key) = match Self::exe(pid) {
            Ok(exe) => exe,
            Err(reason) => return Ok(Err(reason)),
        };
        let cell = self.cell(key);
        let hash = cell
            .get_or_try_init(|| async move {
                self.files_hashed.fetch_add(1, Ordering::Relaxed);
                match tokio::task::spawn_blocking(move || Self::hash(&link, &key)).await {
                    Ok(Ok(h)) => Ok(h),
                    Ok(Err(reason)) => Err(Ok(reason)),
                    Err(e) => Err(Err(AttestError::PeerUnreadable {
                        pid,
                        reason: e.to_string(),
                    })),
                }
            })
            .await;
        match hash {
            Ok(h) => Ok(Ok((path, h.clone()))),
            Err(Ok(reason)) => Ok(Err(reason)),
            Err(Err(e)) => Err(e),
        }
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

    /// This test process, as the peer of a Unix socket with uid 1000.
    fn own_process() -> Evidence {
        Evidence {
            unix_peer: Some(UnixPeer {
                uid: 1000,
                gid: 100,
                pid: Some(std::process::id() as i32),
            }),
            ..Evidence::default()
        }
    }

    #[tokio::test]
    async fn attests_own_process_with_executable_hash() {
        let me = std::process::id() as i32;
        let evidence = own_process();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processes_of_a_new_executable_arriving_together_hash_it_once() {
        let evidence = Arc::new(own_process());
        let a = UnixAttestor::new();
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let (a, evidence) = (a.clone(), evidence.clone());
                tokio::spawn(async move { a.attest(&evidence).await.unwrap().unwrap() })
            })
            .collect();
        let exe = std::env::current_exe().unwrap();
        let want = hex(
            ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&exe).unwrap()).as_ref(),
        );
        for c in calls {
            assert_eq!(c.await.unwrap().claims["exe_sha256"], want.as_str());
        }
        assert_eq!(a.files_hashed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn no_peer_means_no_opinion() {
        let a = UnixAttestor::new();
        assert!(a.attest(&Evidence::default()).await.unwrap().is_none());
    }
}
