//! The audit event of one decision: a guard filled in as the request goes through the flow and
//! emitted exactly once, when it drops. A request abandoned before its outcome was recorded (the
//! caller went away mid-flight) still leaves an event, as a denial saying so.

use std::net::SocketAddr;

use uuid::Uuid;

use super::BrokerError;
use crate::attest::{AttestedIdentity, Evidence};
use crate::id::SpiffeId;

/// How the request ended, as far as the audit log is concerned.
enum Outcome {
    /// Not recorded yet; dropping in this state means the request was abandoned.
    Pending,
    /// Allowed.
    Allowed,
    /// Refused, with the full reason (never shown to the caller) and its code.
    Denied(String, &'static str),
    /// Not a decision of its own (a probe); no event.
    Discarded,
}

impl Outcome {
    fn denied(e: &BrokerError) -> Self {
        Self::Denied(e.to_string(), e.code())
    }
}

/// One audit event, filled in as the request goes through the flow.
pub(super) struct Audit {
    decision_id: Uuid,
    action: &'static str,
    source: Option<SocketAddr>,
    resource: String,
    requested_ttl_secs: Option<u64>,
    attestor: &'static str,
    subject: Option<String>,
    spiffe_id: Option<String>,
    pub(super) granted_ttl_secs: Option<u64>,
    pub(super) policies: Vec<String>,
    pub(super) task_id: Option<String>,
    pub(super) lease_id: Option<String>,
    /// A task's declared scopes (validated: scope tokens of bounded length).
    pub(super) scopes: Vec<String>,
    outcome: Outcome,
}

impl Audit {
    /// A pending event for `action` on `resource`.
    pub(super) fn new(
        action: &'static str,
        evidence: &Evidence,
        resource: String,
        requested_ttl_secs: Option<u64>,
    ) -> Self {
        Self {
            decision_id: Uuid::now_v7(),
            action,
            source: evidence.source,
            resource,
            requested_ttl_secs,
            attestor: "-",
            subject: None,
            spiffe_id: None,
            granted_ttl_secs: None,
            policies: Vec::new(),
            task_id: None,
            lease_id: None,
            scopes: Vec::new(),
            outcome: Outcome::Pending,
        }
    }

    /// The caller was attested as `identity`.
    pub(super) fn attested(&mut self, identity: &AttestedIdentity) {
        self.attestor = identity.attestor;
        self.subject = Some(identity.subject.clone());
    }

    /// The identity the caller was mapped to, once it is known.
    pub(super) fn spiffe_id(&self) -> Option<&str> {
        self.spiffe_id.as_deref()
    }

    /// The caller was mapped to `spiffe_id`.
    pub(super) fn identified(&mut self, spiffe_id: &SpiffeId) {
        self.spiffe_id = Some(spiffe_id.to_string());
    }

    /// Records the request's outcome; the event is written when the guard drops.
    pub(super) fn outcome<T, E: std::borrow::Borrow<BrokerError>>(
        &mut self,
        result: &Result<T, E>,
    ) {
        self.outcome = match result {
            Ok(_) => Outcome::Allowed,
            Err(e) => Outcome::denied(e.borrow()),
        };
    }

    /// Records only a refusal; an `Ok` leaves the event pending (a later step decides).
    pub(super) fn refused<T>(&mut self, result: &Result<T, BrokerError>) {
        if let Err(e) = result {
            self.outcome = Outcome::denied(e);
        }
    }

    /// This event is not a decision of its own: nothing is written.
    pub(super) fn discard(&mut self) {
        self.outcome = Outcome::Discarded;
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let (decision, reason, reason_code) = match &self.outcome {
            Outcome::Discarded => return,
            Outcome::Allowed => ("allow", None, None),
            Outcome::Denied(r, code) => ("deny", Some(r.as_str()), Some(*code)),
            Outcome::Pending => (
                "deny",
                Some("abandoned: the caller went away before a decision"),
                Some("abandoned"),
            ),
        };
        ::metrics::counter!(crate::telemetry::DECISIONS, "action" => self.action, "decision" => decision)
            .increment(1);
        let attestor = self.attestor;
        let subject = self.subject.as_deref().unwrap_or("-");
        let source = self.source.map(|s| s.to_string());
        let policies = self.policies.join(",");
        let scopes = (!self.scopes.is_empty()).then(|| self.scopes.join(" "));
        match reason {
            None => tracing::info!(
                target: "ephemera::audit",
                decision_id = %self.decision_id,
                action = self.action,
                decision,
                attestor,
                subject,
                spiffe_id = self.spiffe_id.as_deref(),
                resource = %self.resource,
                requested_ttl_secs = self.requested_ttl_secs,
                granted_ttl_secs = self.granted_ttl_secs,
                policies = %policies,
                task_id = self.task_id.as_deref(),
                lease_id = self.lease_id.as_deref(),
                scopes = scopes.as_deref(),
                source = source.as_deref(),
                "decision"
            ),
            Some(reason) => tracing::info!(
                target: "ephemera::audit",
                decision_id = %self.decision_id,
                action = self.action,
                decision,
                reason,
                reason_code,
                attestor,
                subject,
                spiffe_id = self.spiffe_id.as_deref(),
                resource = %self.resource,
                requested_ttl_secs = self.requested_ttl_secs,
                task_id = self.task_id.as_deref(),
                scopes = scopes.as_deref(),
                source = source.as_deref(),
                "decision"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_event_is_written_once_when_dropped_and_an_abandoned_request_is_a_denial() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let evidence = Evidence::default();
            // Dropped before any outcome: the caller went away mid-request.
            drop(Audit::new("MintJwtSvid", &evidence, "db".into(), Some(60)));
            let mut allowed = Audit::new("MintJwtSvid", &evidence, "db".into(), None);
            allowed.outcome(&Ok::<(), BrokerError>(()));
            drop(allowed);
            let mut denied = Audit::new("BeginTask", &evidence, "task".into(), None);
            denied.outcome(&Err::<(), _>(BrokerError::TaskNotFound("t1".into())));
            drop(denied);
            // A probe is not a decision of its own.
            let mut probe = Audit::new("MintX509Svid", &evidence, "x509-svid".into(), None);
            probe.refused(&Ok::<(), BrokerError>(()));
            probe.discard();
            drop(probe);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 3, "{text}");
        let field = |i: usize, f: &str| events[i]["fields"][f].as_str().unwrap_or("").to_owned();
        assert_eq!(field(0, "decision"), "deny");
        assert!(field(0, "reason").starts_with("abandoned"), "{text}");
        assert_eq!(field(1, "decision"), "allow");
        assert_eq!(field(2, "decision"), "deny");
        assert_eq!(field(2, "reason"), "unknown task t1");
        assert_eq!(field(2, "reason_code"), "task.not_found");
        assert_eq!(field(0, "reason_code"), "abandoned");
        assert!(events.iter().all(|e| e["target"] == "ephemera::audit"));
    }
}
