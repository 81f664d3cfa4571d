//! HTTP endpoints for relying parties and operators: OIDC discovery, JWKS, SPIFFE bundle, health.
//!
//! Everything served here is public (public keys and certificates); nothing secret is ever
//! rendered by these routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::broker::Broker;
use crate::ca::bundle::openid_configuration;

struct HttpState {
    broker: Arc<Broker>,
    discovery: String,
    jwks: String,
    bundle: String,
}

/// The HTTP routes. `public_url` is the base URL relying parties reach this server at.
pub fn router(broker: Arc<Broker>, public_url: &str) -> Router {
    let ca = broker.ca();
    let issuer = ca.jwt.issuer().unwrap_or(public_url);
    let discovery = openid_configuration(issuer, &format!("{public_url}/keys")).to_string();
    let (jwks, bundle) = (ca.jwks_json.clone(), ca.bundle_json.clone());
    let state = Arc::new(HttpState {
        broker: broker.clone(),
        discovery,
        jwks,
        bundle,
    });
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(|State(s): State<Arc<HttpState>>| async move { json(s.discovery.clone()) }),
        )
        .route(
            "/keys",
            get(|State(s): State<Arc<HttpState>>| async move { json(s.jwks.clone()) }),
        )
        .route(
            "/bundle",
            get(|State(s): State<Arc<HttpState>>| async move { json(s.bundle.clone()) }),
        )
        .route("/crl", get(crl))
        .route(
            "/introspect",
            axum::routing::post(introspect).layer(axum::extract::DefaultBodyLimit::max(64 * 1024)),
        )
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The current CRL, DER (`application/pkix-crl`).
async fn crl(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let der = s.broker.crl().current();
    if der.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            bytes::Bytes::from_static(b"crl not built yet\n"),
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        der,
    )
}

#[derive(serde::Deserialize)]
struct IntrospectForm {
    token: Option<String>,
}

/// RFC 7662 token introspection: `POST` form `token=...`; `{"active": false}` for anything not
/// honoured now, including malformed requests.
async fn introspect(
    State(s): State<Arc<HttpState>>,
    form: Result<axum::Form<IntrospectForm>, axum::extract::rejection::FormRejection>,
) -> impl IntoResponse {
    let inactive = || {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"active": false})),
        )
    };
    let Some(token) = form.ok().and_then(|f| f.0.token) else {
        return inactive();
    };
    match s.broker.introspect(&token).await {
        Ok(i) if i.active => {
            let mut body = i.claims;
            body.insert("active".into(), serde_json::Value::Bool(true));
            body.insert("token_type".into(), serde_json::Value::from("JWT-SVID"));
            if let Some(t) = i.task_id {
                body.insert("task_id".into(), serde_json::Value::from(t));
            }
            (StatusCode::OK, axum::Json(serde_json::Value::Object(body)))
        }
        Ok(_) => inactive(),
        Err(e) => {
            tracing::warn!(error = %e, "introspection unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"error": "temporarily_unavailable"})),
            )
        }
    }
}

/// Prometheus text exposition; the task and lease gauges are sampled from the store now, the
/// CRL size from the CRL served.
async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let now = s.broker.clock().unix_now();
    match s.broker.store().counts(now).await {
        Ok((tasks, leases)) => {
            ::metrics::gauge!(crate::telemetry::ACTIVE_TASKS).set(tasks as f64);
            ::metrics::gauge!(crate::telemetry::ACTIVE_LEASES).set(leases as f64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot sample task and lease counts"),
    }
    ::metrics::gauge!(crate::telemetry::CRL_BYTES).set(s.broker.crl().current().len() as f64);
    let body = crate::telemetry::handle()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Ready when the store answers: a broker that cannot record leases must not get traffic.
/// How long `/readyz` waits for the store.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn readyz(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let ping = tokio::time::timeout(READY_TIMEOUT, s.broker.store().ping())
        .await
        .unwrap_or_else(|_| {
            Err(crate::store::StoreError::Unavailable(
                "no answer within 2s".into(),
            ))
        });
    match ping {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: store unavailable\n".to_owned(),
            )
        }
    }
}

fn json(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}
