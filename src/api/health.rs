//! gRPC health and reflection, per listener: each listener lists exactly the services it serves
//! (reflection v1 and v1alpha, for grpcurl, grpc_cli, the C++ client and Python's
//! grpcio-reflection), and reports a status for each of them (`grpc.health.v1`).
//!
//! Every service here needs the store (nothing is issued without a durable lease, and watch
//! and introspection read it), so the [`HealthWorker`] checks the store every
//! [`HEALTH_INTERVAL`] and reports every service, and the server as a whole (`""`),
//! `NOT_SERVING` while it is unreachable.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::ShutdownSignal;
use crate::store::Store;

/// How often the store is checked for health reporting.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// How long one store check may take before it counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The services of the broker's own listeners (TCP and the broker socket).
pub const BROKER_SERVICES: &[&str] = &[
    "ephemera.v1.Broker",
    "ephemera.v1.Admin",
    "ephemera.v1.Revocations",
];

/// The services of the Workload API socket.
pub const WORKLOAD_SERVICES: &[&str] = &[
    "SpiffeWorkloadAPI",
    "envoy.service.secret.v3.SecretDiscoveryService",
];

/// The reflection services of a listener serving `services`: v1 and v1alpha, listing exactly
/// `services` and the health and reflection services themselves.
pub fn reflection(
    services: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for s in services {
            b = b.with_service_name(*s);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Reports each listener's services healthy while the store answers.
pub struct HealthWorker {
    /// The store every service needs.
    pub store: Arc<dyn Store>,
    /// Each listener's health reporter and the services it serves.
    pub reporters: Vec<(HealthReporter, &'static [&'static str])>,
}

impl HealthWorker {
    /// Reports every service `SERVING` now (the store was reached at start), then starts the
    /// worker; it stops at `shutdown`.
    pub async fn start(self, mut shutdown: ShutdownSignal) -> JoinHandle<()> {
        self.report(ServingStatus::Serving).await;
        tokio::spawn(async move {
            let mut serving = true;
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.wait() => {
                        // Draining: clients should go elsewhere.
                        self.report(ServingStatus::NotServing).await;
                        return;
                    }
                    _ = tick.tick() => {}
                }
                let ok = matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, self.store.ping()).await,
                    Ok(Ok(()))
                );
                if ok != serving {
                    serving = ok;
                    if ok {
                        tracing::info!("store reachable again: gRPC health SERVING");
                    } else {
                        tracing::warn!("store unreachable: gRPC health NOT_SERVING");
                    }
                    self.report(if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    })
                    .await;
                }
            }
        })
    }

    async fn report(&self, status: ServingStatus) {
        for (reporter, services) in &self.reporters {
            reporter.set_service_status("", status).await;
            for s in *services {
                reporter.set_service_status(*s, status).await;
            }
        }
    }
}
