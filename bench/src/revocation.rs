//! Part 2: revocation propagation to the watch stream, introspection and the CRL.

use crate::*;

/// A bare HTTP/1.1 request on loopback; returns (status, body).
pub(crate) async fn http(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let host = base.strip_prefix("http://").context("http:// base")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let status = std::str::from_utf8(&buf[..split])?
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, buf[split + 4..].to_vec()))
}

pub(crate) async fn introspect_inactive(http_base: &str, token: &str) -> anyhow::Result<bool> {
    let (_, body) = http(http_base, "POST", "/introspect", &format!("token={token}")).await?;
    Ok(!String::from_utf8_lossy(&body).contains("\"active\":true"))
}

/// Polls `/crl` until it lists every one of `serials` (hex; at most 30 s), and returns when
/// each was first listed. One poller serves all of them: each round fetches and parses the CRL
/// once, so many serials watched together do not load the machine with CRL downloads.
pub(crate) async fn crl_observed(
    http_base: &str,
    serials: &[String],
) -> anyhow::Result<Vec<Instant>> {
    let wanted = serials
        .iter()
        .map(|s| ephemera::ca::crl::parse_hex(s).ok_or_else(|| anyhow!("serial {s:?} is not hex")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen: Vec<Option<Instant>> = vec![None; wanted.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            bail!("not in the CRL within 30s");
        }
        let (_, der) = http(http_base, "GET", "/crl", "").await?;
        let fetched = Instant::now();
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| anyhow!("CRL: {e}"))?;
        let listed: std::collections::HashSet<&[u8]> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial())
            .collect();
        for (at, serial) in seen.iter_mut().zip(&wanted) {
            if at.is_none() && listed.contains(serial.as_slice()) {
                *at = Some(fetched);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(seen.into_iter().flatten().collect())
}

/// Polls `check` every millisecond until it holds (at most 30s); returns when it first did.
pub(crate) async fn until<F, Fut>(mut check: F) -> anyhow::Result<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check().await? {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("not observed within 30s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Trigger {
    EndTask,
    KeepAliveLoss,
    AdminRevoke,
}

pub(crate) struct Minted {
    pub(crate) task_id: String,
    pub(crate) token: String,
    pub(crate) serial: String,
}

pub(crate) async fn mint_in_task(client: &mut BrokerClient<Channel>) -> anyhow::Result<Minted> {
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await?
        .into_inner();
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["bench".into()],
            task_id: task.task_id.clone(),
            ..MintJwtSvidRequest::default()
        })
        .await?
        .into_inner();
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task.task_id.clone(),
            ..MintX509SvidRequest::default()
        })
        .await?
        .into_inner();
    Ok(Minted {
        task_id: task.task_id,
        token: jwt.token,
        serial: x.serial,
    })
}

pub(crate) async fn revocation(target: &Arc<Target>, count: usize) -> anyhow::Result<Value> {
    let http_base = target.http.clone().context("no HTTP address")?;
    let channel = target.channel(Transport::Unix).await?;
    let mut client = BrokerClient::new(channel.clone());
    let mut admin = AdminClient::new(channel.clone());
    // One watcher for the whole run records when each task's event arrived.
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut stream = RevocationsClient::new(channel.clone())
        .watch(WatchRequest { cursor: None })
        .await?
        .into_inner();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        if let Ok(mut s) = seen.lock() {
                            s.entry(ev.task_id).or_insert_with(Instant::now);
                        }
                    }
                    Ok(None) => {
                        eprintln!("the watch stream ended");
                        break;
                    }
                    Err(e) => {
                        eprintln!("the watch stream failed: {e}");
                        break;
                    }
                }
            }
        })
    };
    let wait_watch = |task_id: String| {
        let seen = seen.clone();
        async move {
            until(|| {
                let hit = seen.lock().map(|s| s.get(&task_id).copied()).ok().flatten();
                async move { Ok(hit.is_some()) }
            })
            .await
            .context("the watch event")?;
            let at = seen.lock().ok().and_then(|s| s.get(&task_id).copied());
            at.context("watch event")
        }
    };

    let mut out = serde_json::Map::new();
    for trigger in [
        Trigger::EndTask,
        Trigger::AdminRevoke,
        Trigger::KeepAliveLoss,
    ] {
        let (mut to_watch, mut to_introspect, mut to_crl) = (Vec::new(), Vec::new(), Vec::new());
        // Keep-alive loss takes a grace period each, so those tasks run together.
        let batch = if matches!(trigger, Trigger::KeepAliveLoss) {
            count
        } else {
            1
        };
        let mut left = count;
        while left > 0 {
            let n = batch.min(left);
            left -= n;
            let mut minted = Vec::new();
            let mut streams = Vec::new();
            for _ in 0..n {
                let m = mint_in_task(&mut client).await?;
                if matches!(trigger, Trigger::KeepAliveLoss) {
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    tx.send(KeepAliveRequest {
                        task_id: m.task_id.clone(),
                    })
                    .await?;
                    let resp = client
                        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?;
                    streams.push((tx, resp));
                }
                minted.push(m);
            }
            let t0 = Instant::now();
            match trigger {
                Trigger::EndTask => {
                    for m in &minted {
                        client
                            .end_task(EndTaskRequest {
                                task_id: m.task_id.clone(),
                            })
                            .await?;
                    }
                }
                Trigger::AdminRevoke => {
                    for m in &minted {
                        admin
                            .revoke_task(target.admin(RevokeTaskRequest {
                                task_id: m.task_id.clone(),
                            })?)
                            .await?;
                    }
                }
                Trigger::KeepAliveLoss => drop(streams),
            }
            let observed = minted.iter().map(|m| {
                let http_base = http_base.clone();
                let watch = wait_watch(m.task_id.clone());
                let token = m.token.clone();
                async move {
                    let w = watch.await?;
                    let i = until(|| introspect_inactive(&http_base, &token))
                        .await
                        .context("introspection inactive")?;
                    anyhow::Ok((w, i))
                }
            });
            let serials: Vec<String> = minted.iter().map(|m| m.serial.clone()).collect();
            let (observed, in_crl) = tokio::join!(
                futures_join_all(observed),
                crl_observed(&http_base, &serials)
            );
            for r in observed {
                let (w, i) = r?;
                to_watch.push(w.saturating_duration_since(t0));
                to_introspect.push(i.saturating_duration_since(t0));
            }
            to_crl.extend(in_crl?.into_iter().map(|c| c.saturating_duration_since(t0)));
        }
        let key = match trigger {
            Trigger::EndTask => "end_task",
            Trigger::AdminRevoke => "admin_revoke",
            Trigger::KeepAliveLoss => "keep_alive_loss",
        };
        out.insert(
            key.into(),
            json!({
                "tasks": count,
                "to_watch_event": latency_json(to_watch),
                "to_introspection_inactive": latency_json(to_introspect),
                "to_crl": latency_json(to_crl),
            }),
        );
    }
    watcher.abort();
    out.insert(
        "note".into(),
        json!("keep_alive_loss is timed from the stream's close; it includes the 1s grace and up to 1s until the reaper's next pass"),
    );
    Ok(Value::Object(out))
}

/// Runs futures concurrently and collects their results in order.
pub(crate) async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
