//! The one shutdown signal: `app.rs` holds the [`Shutdown`] trigger; every worker, server and
//! long-lived stream waits on a [`ShutdownSignal`] cloned from it.

use tokio::sync::watch;

/// Triggers shutdown.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// Resolves when shutdown is triggered (or the trigger is gone).
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Shutdown {
    /// A trigger not yet pulled.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal that resolves when [`Self::trigger`] is called.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.0.subscribe())
    }

    /// Starts shutdown: every signal resolves.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown has been triggered, or its trigger dropped.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}
