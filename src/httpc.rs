//! A small, bounded HTTP/1.1 client for the few outbound fetches Ephemera makes: JWKS documents
//! (broker side) and CI ID tokens (client side).
//!
//! Only `https://` (rustls on ring, with the system's roots or a given CA file) and `http://` to a
//! loopback address are allowed. Response bodies are capped; callers bound the time.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Whether `url` may be used: `https://`, or `http://` to a loopback address.
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid URL {url:?}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("URL {url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "{url:?}: plain http is allowed only on loopback; use https"
                ))
            }
        }
        _ => Err(format!("{url:?} must be an https:// URL")),
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for p in pem::parse_many(&pem).map_err(|e| format!("{}: {e}", path.display()))? {
                roots
                    .add(p.into_contents().into())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// GETs `url` with `headers` and returns the body of a 200 response, at most `max_bytes` long.
///
/// Errors name the URL (never a header value: they may carry bearer tokens).
pub async fn get(
    url: &str,
    ca_file: Option<&Path>,
    headers: &[(http::HeaderName, http::HeaderValue)],
    max_bytes: usize,
) -> Result<Vec<u8>, String> {
    check_url(url)?;
    let err = |e: &dyn std::fmt::Display| format!("fetching {url}: {e}");
    let uri: http::Uri = url.parse().map_err(|e| err(&e))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
        .await
        .map_err(|e| err(&e))?;
    let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| err(&e))?;
    for (name, value) in headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = if https {
        let config = tls_config(ca_file)?;
        let name =
            rustls::pki_types::ServerName::try_from(bare_host.clone()).map_err(|e| err(&e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| err(&e))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
    .map_err(|e| err(&e))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("fetching {url}: HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|e| err(&e))?;
    Ok(body.to_bytes().to_vec())
}

async fn send<T>(
    io: TokioIo<T>,
    req: http::Request<Empty<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://token.actions.githubusercontent.com/.well-known/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        assert!(check_url("http://[::1]:1/jwks").is_ok());
        assert!(check_url("http://example.com/jwks").is_err());
        assert!(check_url("ftp://x/jwks").is_err());
    }
}
