//! Prometheus metrics: the process-wide recorder and the names every part records under.
//!
//! Names are `ephemera_*` with units in the name. Labels are low-cardinality classes (kind,
//! action, decision, reason class), never SPIFFE IDs, tokens or serials.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Credentials minted, by `kind` (`x509`, `jwt`).
pub const ISSUED: &str = "ephemera_credentials_issued_total";
/// Decisions, by `action` and `decision` (`allow`, `deny`).
pub const DECISIONS: &str = "ephemera_decisions_total";
/// Revocations committed, by `reason` class.
pub const REVOCATIONS: &str = "ephemera_revocations_total";
/// Mint latency, by `kind`.
pub const MINT_SECONDS: &str = "ephemera_mint_duration_seconds";
/// Lease group-commit latency.
pub const COMMIT_SECONDS: &str = "ephemera_store_commit_duration_seconds";
/// Leases per group commit.
pub const COMMIT_BATCH: &str = "ephemera_store_commit_batch_leases";
/// From a revocation reaching the CRL builder to the new CRL being served.
pub const PROPAGATION_SECONDS: &str = "ephemera_revocation_propagation_seconds";
/// Active tasks, sampled at scrape time.
pub const ACTIVE_TASKS: &str = "ephemera_active_tasks";
/// Honoured leases, sampled at scrape time.
pub const ACTIVE_LEASES: &str = "ephemera_active_leases";
/// Size of the CRL served (DER bytes), sampled at scrape time: the Workload API leaves it out
/// above `workload_api.crl_max_bytes`.
pub const CRL_BYTES: &str = "ephemera_crl_bytes";

/// Seconds until the intermediate CA can no longer cover the longest X.509-SVID lifetime
/// (its notAfter minus now minus `x509_svid.max_ttl`), sampled at scrape time: below zero,
/// new certificates are cut short; alert well before.
pub const INTERMEDIATE_COVERAGE_SECONDS: &str = "ephemera_intermediate_coverage_seconds";

/// Locks this replica enforces (expired ones until pruned).
pub const LOCKS: &str = "ephemera_locks";

const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide recorder, installed on first use. `None` if another recorder was
/// installed first (metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new().set_buckets(BUCKETS) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics buckets rejected");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match ::metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    // Histogram samples are held until upkeep folds them into buckets; without
                    // it (nobody scraping /metrics) they accumulate without bound.
                    let upkeep = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("ephemera-metrics".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(UPKEEP_EVERY);
                                upkeep.run_upkeep();
                            }
                        });
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("another metrics recorder is installed; /metrics is empty");
                    None
                }
            }
        })
        .as_ref()
}

/// The low-cardinality class of a revocation reason.
pub fn reason_class(reason: &str) -> &'static str {
    if reason.starts_with("ended by its owner") {
        "owner"
    } else if reason.starts_with("keep-alive") {
        "keepalive_lost"
    } else if reason.starts_with("deadline") {
        "deadline"
    } else if reason.contains("by admin") {
        "admin"
    } else if reason.starts_with("policy") {
        "policy"
    } else if reason.starts_with("locked") {
        "locked"
    } else if reason.starts_with("key revoked") {
        "key_revoked"
    } else if reason.starts_with("workload stream") {
        "workload_exited"
    } else {
        "other"
    }
}

/// Counts one committed revocation.
pub fn revoked(reason: &str) {
    ::metrics::counter!(REVOCATIONS, "reason" => reason_class(reason)).increment(1);
}
