//! The PostgreSQL revocation feed: a worker that follows revocations committed by any replica
//! and publishes on this process's bus the ones it has not published itself. It listens for
//! the store's notifications; after a lost connection it reads what it missed from the event
//! log, and it polls every [`FEED_POLL`] as a safety net.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::RevocationBus;
use crate::shutdown::ShutdownSignal;
use crate::store::Store;
use crate::store::postgres::{PostgresStore, RevocationNotices};

/// Longest wait between reads of the event log when no notification arrives.
pub const FEED_POLL: Duration = Duration::from_secs(2);

/// Follows the revocations of every replica sharing one PostgreSQL database.
pub struct RevocationFeed {
    /// The shared store.
    pub store: PostgresStore,
    /// This process's bus.
    pub bus: RevocationBus,
}

impl RevocationFeed {
    /// Starts the worker; it stops at `shutdown`.
    pub fn start(self, shutdown: ShutdownSignal) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    async fn run(self, mut shutdown: ShutdownSignal) {
        let Self { store, bus } = self;
        // Start after the newest committed event: history is the watchers' to replay, not the
        // bus's.
        let mut last = loop {
            match store.newest_revocation().await {
                Ok(seq) => break seq,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed cannot read the event log; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.wait() => return,
                    }
                }
            }
        };
        let mut notices: Option<RevocationNotices> = None;
        loop {
            if notices.is_none() {
                match store.revocation_notices().await {
                    Ok(n) => notices = Some(n),
                    Err(e) => tracing::warn!(error = %e, "cannot LISTEN for revocations"),
                }
            }
            let woke = async {
                match notices.as_mut() {
                    Some(n) => tokio::time::timeout(FEED_POLL, n.recv())
                        .await
                        .unwrap_or(Ok(())),
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(())
                    }
                }
            };
            tokio::select! {
                r = woke => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "revocation notifications interrupted; catching up from the log");
                        notices = None;
                    }
                }
                () = shutdown.wait() => return,
            }
            // Whatever woke us, publish everything committed since `last`, in order.
            loop {
                match store.revocations_after(last, 256).await {
                    Ok(page) if page.is_empty() => break,
                    Ok(page) => {
                        for r in page {
                            last = r.seq;
                            bus.publish_from_store(r);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "revocation feed cannot read the event log");
                        break;
                    }
                }
            }
        }
    }
}
