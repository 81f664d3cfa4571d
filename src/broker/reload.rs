//! The reloader: a worker that re-reads the policy directory and the config file's mapping
//! rules when they change (a broken edit keeps the previous ones serving), and decides every
//! live task again after each policy reload, from the file watch or the Admin API alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use super::Broker;
use crate::shutdown::ShutdownSignal;

/// How often the policy directory and the config file are checked for changes.
pub const POLICY_POLL: Duration = Duration::from_secs(1);

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
                                let _ = load(&broker, path);
                            }
                        }
                    }
                    r = reloads.changed() => {
                        if r.is_err() {
                            return;
                        }
                        match broker.reevaluate_tasks().await {
                            Ok(revoked) if !revoked.is_empty() => {
                                tracing::info!(tasks = revoked.len(), "policy reload revoked live tasks");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "re-evaluating tasks after a policy reload failed"),
                        }
                    }
                }
            }
        })
    }
}
