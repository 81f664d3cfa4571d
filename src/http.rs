//! HTTP endpoints for relying parties and operators: OIDC discovery, JWKS, SPIFFE bundle, health.
//!
//! Everything served here is public (public keys and certificates); nothing secret is ever
//! rendered by these routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::broker::Broker;
use crate::ca::bundle::openid_configuration;

struct HttpState {
    broker: Arc<Broker>,
    discovery: String,
}

/// The HTTP routes. `public_url` is the base URL relying parties reach this server at.
pub fn router(broker: Arc<Broker>, public_url: &str) -> Router {
    let issuer = broker.ca().issuer().unwrap_or(public_url);
    let discovery = openid_configuration(issuer, &format!("{public_url}/keys")).to_string();
    let state = Arc::new(HttpState {
        broker: broker.clone(),
        discovery,
    });
    Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(|State(s): State<Arc<HttpState>>| async move { json(s.discovery.clone()) }),
        )
        .route(
            "/keys",
            get(|State(s): State<Arc<HttpState>>| async move {
                let keys = s.broker.ca().keys();
                cached(keys.jwks_json.clone(), keys.refresh_hint)
            }),
        )
        .route(
            "/bundle",
            get(|State(s): State<Arc<HttpState>>| async move {
                let keys = s.broker.ca().keys();
                cached(keys.bundle_json.clone(), keys.refresh_hint)
            }),
        )
        .route("/crl", get(crl))
        .route("/crl/{key}", get(key_crl))
        .route(
            "/introspect",
            axum::routing::post(introspect).layer(axum::extract::DefaultBodyLimit::max(64 * 1024)),
        )
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Public keys that change on the rotation schedule: JSON, cacheable for the refresh hint (a
/// relying party that caches no longer than that sees every key before it signs).
fn cached(body: String, max_age: u64) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CACHE_CONTROL, format!("public, max-age={max_age}")),
        ],
        body,
    )
}

/// The active intermediate's CRL, DER (`application/pkix-crl`).
async fn crl(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    crl_response(s.broker.crl().current())
}

/// The CRL of one intermediate (by key id): what the CRL distribution point of every
/// certificate it signed names.
async fn key_crl(State(s): State<Arc<HttpState>>, Path(key): Path<String>) -> impl IntoResponse {
    match s.broker.crl().for_key(&key) {
        Some(der) => crl_response(der).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "no published intermediate has this key id\n",
        )
            .into_response(),
    }
}

fn crl_response(der: bytes::Bytes) -> impl IntoResponse {
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
    ::metrics::gauge!(crate::telemetry::INTERMEDIATE_COVERAGE_SECONDS)
        .set(s.broker.intermediate_coverage_secs() as f64);
    let body = crate::telemetry::handle()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Ready when the store answers: a broker that cannot record leases must not get traffic.
/// Below this much intermediate coverage, `/readyz` says so (it stays ready).
const INTERMEDIATE_WARNING: i64 = 30 * 86_400;

fn secs_of(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

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
    let coverage = s.broker.intermediate_coverage_secs();
    let max_ttl = secs_of(s.broker.limits().x509.max_ttl.duration());
    if coverage + max_ttl <= 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the intermediate CA has expired and no successor is staged; X.509-SVIDs cannot be minted (docs/key-lifecycle.md)\n"
                .to_owned(),
        );
    }
    let keys = s.broker.ca().keys();
    if keys.x509().is_err() || keys.jwt().is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no usable signing key: {}\n",
                keys.problems.join("; ")
            ),
        );
    }
    let mut warnings = Vec::new();
    if coverage < INTERMEDIATE_WARNING {
        warnings.push(format!(
            "warning: the intermediate CA ends in {} days and covers the longest X.509-SVID lifetime for {} more (stage a successor: docs/key-lifecycle.md)",
            (coverage + max_ttl) / 86_400,
            if coverage > 0 {
                format!("{} days", coverage / 86_400)
            } else {
                "no days: new certificates are cut short".to_owned()
            }
        ));
    }
    if keys
        .keys
        .iter()
        .any(|k| k.state == crate::store::KeyState::Pending)
    {
        warnings.push(
            "warning: the next intermediate CA waits for the offline root to sign its CSR (`ephemera ca csr`; docs/key-lifecycle.md)"
                .to_owned(),
        );
    }
    warnings.extend(keys.problems.iter().map(|p| format!("warning: {p}")));
    match ping {
        Ok(()) if warnings.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
        Ok(()) => (StatusCode::OK, format!("ready; {}\n", warnings.join("; "))),
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

/// Serves `app` on `listener` until `shutdown`, with bounds on every connection: a request's
/// header must arrive within `header_read` (hyper's header read timeout), and a connection
/// with no bytes moving for `idle` is closed, so slow or idle clients cannot hold descriptors.
/// In-flight requests finish before the server returns (bounded by the caller's shutdown
/// grace).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: crate::config::HttpTimeouts,
    mut shutdown: crate::shutdown::ShutdownSignal,
) -> Result<(), String> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Finished connections are reaped as new ones arrive.
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            () = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let mut stop = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            let io = TokioIo::new(IdleBound::new(stream, timeouts.idle));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                () = stop.wait() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A connection closed (as if the client had) once no bytes have moved either way for `idle`.
struct IdleBound<S> {
    inner: S,
    idle: std::time::Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleBound<S> {
    fn new(inner: S, idle: std::time::Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(next);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleBound<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        match polled {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() > before => this.touch(),
            std::task::Poll::Pending if this.timer.as_mut().poll(cx).is_ready() => {
                tracing::debug!("http connection closed: idle");
                return std::task::Poll::Ready(Ok(()));
            }
            _ => {}
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleBound<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.touch();
        }
        polled
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
