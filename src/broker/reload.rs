//! The reloader: a worker that re-reads the policy directory and the config file's mapping
//! rules when they change (a broken edit keeps the previous ones serving), and decides every
//! live task and credential again after each reload (see [`super::trust`]), from the file
//! watch or the Admin API alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use super::Broker;
use crate::shutdown::ShutdownSignal;

/// How often the policy directory and the config file are checked for changes: a directory
/// listing and a `stat` per file, so an edit serves within about a tenth of a second. Polling
/// (rather than inotify) also sees edits that notifications miss: a Kubernetes ConfigMap's
/// symlink swap, network file systems, a directory replaced whole.
pub const POLICY_POLL: Duration = Duration::from_millis(100);

/// Re-reads mapping rules from a config file into the broker; returns how many rules serve.
pub type MappingLoader = Box<dyn Fn(&Broker, &Path) -> Result<usize, String> + Send + Sync>;

/// Watches policies and mapping rules and re-evaluates live tasks after policy reloads.
pub struct Reloader {
    /// The broker whose policy and mappings are reloaded.
    pub broker: Arc<Broker>,
    /// The config file holding the mapping rules, and how to load them; `None` when the
    /// broker was not started from a file.
    pub mappings: Option<(PathBuf, MappingLoader)>,
}

/// Logs what deciding every live credential again did after a reload of `what`.
fn report(r: Result<super::trust::Redecision, super::BrokerError>, what: &str) {
    match r {
        Ok(r) => match &r.revoked {
            Some(revoked) => tracing::info!(
                reloaded = what,
                tasks = revoked.task_ids.len(),
                credentials = revoked.leases,
                grants_decided = r.grants_decided,
                elapsed_ms = r.elapsed.as_millis() as u64,
                "reload revoked what is no longer permitted"
            ),
            None => tracing::debug!(
                reloaded = what,
                grants_decided = r.grants_decided,
                elapsed_ms = r.elapsed.as_millis() as u64,
                "reload revoked nothing"
            ),
        },
        Err(e) => {
            tracing::error!(reloaded = what, error = %e, "deciding live credentials again after a reload failed")
        }
    }
}

/// Modification time and size of a file, to notice edits.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Reloader {
    /// Starts the worker; it stops at `shutdown`.
    pub fn start(self, mut shutdown: ShutdownSignal) -> JoinHandle<()> {
        tokio::spawn(async move {
            let Self { broker, mappings } = self;
            let mut reloads = broker.policy().subscribe();
            let mut config_stamp = mappings.as_ref().and_then(|(p, _)| file_stamp(p));
            let mut tick = tokio::time::interval(POLICY_POLL);
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    _ = tick.tick() => {
                        let b = broker.clone();
                        let _ = tokio::task::spawn_blocking(move || b.policy().reload_if_changed()).await;
                        if let Some((path, load)) = &mappings {
                            let stamp = file_stamp(path);
                            if stamp != config_stamp {
                                config_stamp = stamp;
                                if load(&broker, path).is_ok() {
                                    report(broker.redecide_mapping().await, "mapping rules");
                                }
                            }
                        }
                    }
                    r = reloads.changed() => {
                        if r.is_err() {
                            return;
                        }
                        report(broker.redecide_policy().await, "policies");
                    }
                }
            }
        })
    }
}
