//! Part 1: issuance throughput, latency and CPU per credential, per transport and credential kind.

use crate::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    X509Csr,
    X509Keygen,
    Jwt,
}

impl Kind {
    pub(crate) fn name(self, transport: Transport) -> &'static str {
        match (self, transport) {
            (Self::X509Csr, _) => "x509-svid (CSR)",
            (Self::X509Keygen, Transport::Workload) => "x509-svid (stream+task)",
            (Self::X509Keygen, _) => "x509-svid (broker key)",
            (Self::Jwt, _) => "jwt-svid",
        }
    }
}

/// The timed part of an issuance run: requests started before `start` are warm-up.
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub(crate) start: tokio::time::Instant,
    pub(crate) end: tokio::time::Instant,
}

impl Window {
    /// Starts after a warm-up of a fifth of `seconds` (at most 1 s) from now.
    pub(crate) fn after_warmup(seconds: f64) -> Self {
        let warmup = Duration::from_secs_f64((seconds / 5.0).min(1.0));
        let start = tokio::time::Instant::now() + warmup;
        Self {
            start,
            end: start + Duration::from_secs_f64(seconds),
        }
    }

    /// When the next request starts, or `None` once the window has closed.
    pub(crate) fn next(&self) -> Option<tokio::time::Instant> {
        let t0 = tokio::time::Instant::now();
        (t0 < self.end).then_some(t0)
    }
}

/// One client's requests inside the window: latencies of those that succeeded, and failures.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) errors: u64,
}

impl Tally {
    pub(crate) fn record(&mut self, window: &Window, t0: tokio::time::Instant, ok: bool) {
        if t0 < window.start {
            return;
        }
        if ok {
            self.latencies.push(t0.elapsed());
        } else {
            self.errors += 1;
        }
    }
}

/// Broker API clients: each with its own connection and task, kept alive, ready before the
/// window opens. Returns the clients' workers and the keep-alive senders to stop afterwards.
pub(crate) async fn broker_clients(
    target: &Arc<Target>,
    transport: Transport,
    kind: Kind,
    clients: usize,
    seconds: f64,
    csrs: &Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<(
    Window,
    Vec<tokio::task::JoinHandle<Tally>>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let mut setups = Vec::new();
    let mut keepers = Vec::new();
    for _ in 0..clients {
        let channel = target.channel(transport).await?;
        let mut client = BrokerClient::new(channel);
        let task = client
            .begin_task(target.request(transport, BeginTaskRequest::default()))
            .await?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(KeepAliveRequest {
            task_id: task.task_id.clone(),
        })
        .await?;
        let stream = client
            .keep_alive(target.request(transport, tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await?;
        let every = Duration::from_secs(task.heartbeat_interval_seconds.max(1)) / 2;
        keepers.push(tokio::spawn(async move {
            let _stream = stream;
            loop {
                tokio::time::sleep(every).await;
                if tx.send(KeepAliveRequest::default()).await.is_err() {
                    return;
                }
            }
        }));
        setups.push((client, task.task_id));
    }
    let window = Window::after_warmup(seconds);
    let mut workers = Vec::new();
    for (i, (mut client, task_id)) in setups.into_iter().enumerate() {
        let (target, csrs) = (target.clone(), csrs.clone());
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = i;
            while let Some(t0) = window.next() {
                let ok = match kind {
                    Kind::Jwt => client
                        .mint_jwt_svid(target.request(
                            transport,
                            MintJwtSvidRequest {
                                audience: vec!["bench".into()],
                                task_id: task_id.clone(),
                                ..MintJwtSvidRequest::default()
                            },
                        ))
                        .await
                        .is_ok(),
                    Kind::X509Csr | Kind::X509Keygen => client
                        .mint_x509_svid(target.request(
                            transport,
                            MintX509SvidRequest {
                                csr: if kind == Kind::X509Csr {
                                    csrs[n % csrs.len()].clone()
                                } else {
                                    Vec::new()
                                },
                                task_id: task_id.clone(),
                                ..MintX509SvidRequest::default()
                            },
                        ))
                        .await
                        .is_ok(),
                };
                n += clients;
                tally.record(&window, t0, ok);
            }
            let _ = client
                .end_task(target.request(transport, EndTaskRequest { task_id }))
                .await;
            tally
        }));
    }
    Ok((window, workers, keepers))
}

/// A Workload API request: the security header every call must carry.
pub(crate) fn workload_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        ephemera::api::workload::HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// SPIFFE Workload API clients, each on its own connection, attested by its peer credentials
/// like any workload. JWT: `FetchJWTSVID` calls. X.509: a workload starting up, over and over:
/// open `FetchX509SVID` (a task begins and an SVID is minted with a broker key), wait for the
/// first response, close the stream (the task ends and the SVID is revoked).
pub(crate) async fn workload_clients(
    target: &Arc<Target>,
    kind: Kind,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<(Window, Vec<tokio::task::JoinHandle<Tally>>)> {
    let mut channels = Vec::new();
    for _ in 0..clients {
        channels.push(target.channel(Transport::Workload).await?);
    }
    let window = Window::after_warmup(seconds);
    let workers = channels
        .into_iter()
        .map(|channel| {
            let mut client = SpiffeWorkloadApiClient::new(channel);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while let Some(t0) = window.next() {
                    let ok = match kind {
                        Kind::Jwt => client
                            .fetch_jwtsvid(workload_request(JwtsvidRequest {
                                audience: vec!["bench".into()],
                                spiffe_id: String::new(),
                            }))
                            .await
                            .is_ok_and(|r| r.get_ref().svids.iter().any(|s| !s.svid.is_empty())),
                        Kind::X509Csr | Kind::X509Keygen => {
                            match client
                                .fetch_x509svid(workload_request(X509svidRequest {}))
                                .await
                            {
                                Ok(r) => r.into_inner().message().await.is_ok_and(|m| {
                                    m.is_some_and(|m| {
                                        m.svids.iter().any(|s| {
                                            !s.x509_svid.is_empty() && !s.x509_svid_key.is_empty()
                                        })
                                    })
                                }),
                                Err(_) => false,
                            }
                        }
                    };
                    tally.record(&window, t0, ok);
                }
                tally
            })
        })
        .collect();
    Ok((window, workers))
}

pub(crate) async fn issuance_run(
    target: &Arc<Target>,
    transport: Transport,
    kind: Kind,
    clients: usize,
    seconds: f64,
    csrs: &Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<Value> {
    let (window, workers, keepers) = if transport == Transport::Workload {
        let (window, workers) = workload_clients(target, kind, clients, seconds).await?;
        (window, workers, Vec::new())
    } else {
        broker_clients(target, transport, kind, clients, seconds, csrs).await?
    };
    tokio::time::sleep_until(window.start).await;
    let commits0 = commit_totals(target).await;
    let cpu0 = target.cpu.read();
    let sqlite0 = target.cpu.read_sqlite();
    let wall0 = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let tally = w.await?;
        all.extend(tally.latencies);
        errors += tally.errors;
    }
    for k in keepers {
        k.abort();
    }
    let wall = wall0.elapsed().as_secs_f64().min(seconds).max(1e-9);
    let cpu = target.cpu.read().zip(cpu0).map(|(b, a)| b - a);
    let sqlite = target.cpu.read_sqlite().zip(sqlite0).map(|(b, a)| b - a);
    let leases_per_commit =
        commit_totals(target)
            .await
            .zip(commits0)
            .and_then(|((leases, commits), (l0, c0))| {
                (commits > c0).then(|| ((leases - l0) / (commits - c0) * 10.0).round() / 10.0)
            });
    let n = all.len();
    Ok(json!({
        "transport": transport.name(),
        "credential": kind.name(transport),
        "clients": clients,
        "credentials": n,
        "errors": errors,
        "per_second": (n as f64 / wall).round(),
        "latency": latency_json(all),
        "broker_cpu_us_per_credential": cpu.map(|c| (c / n.max(1) as f64 * 1e7).round() / 10.0),
        "sqlite_cpu_us_per_credential": sqlite.map(|c| (c / n.max(1) as f64 * 1e7).round() / 10.0),
        "leases_per_commit": leases_per_commit,
    }))
}

/// Leases committed and commits so far, from the broker's `/metrics` (in-process broker only).
pub(crate) async fn commit_totals(target: &Target) -> Option<(f64, f64)> {
    let (_, body) = http(target.http.as_deref()?, "GET", "/metrics", "")
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    Some((
        value("ephemera_store_commit_batch_leases_sum")?,
        value("ephemera_store_commit_batch_leases_count")?,
    ))
}

pub(crate) async fn issuance(
    target: &Arc<Target>,
    args: &Args,
    sign_rate: f64,
) -> anyhow::Result<Value> {
    // CSRs made before timing: 256 distinct P-256 keys, cycled.
    let csrs = Arc::new(
        (0..256)
            .map(|_| {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                Ok(rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .der()
                    .to_vec())
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let mut transports = Vec::new();
    if target.tcp.is_some() && target.tcp_evidence.is_some() {
        transports.push(Transport::Tcp);
    }
    if !target.socket.as_os_str().is_empty() {
        transports.push(Transport::Unix);
    }
    if target.workload_socket.is_some() {
        transports.push(Transport::Workload);
    }
    let mut runs = Vec::new();
    for t in transports {
        // The Workload API mints with broker keys only. Its X.509 run goes last: every stream
        // it closes revokes a certificate, and the CRL carries them until they expire.
        let kinds: &[Kind] = match t {
            Transport::Workload => &[Kind::Jwt, Kind::X509Keygen],
            _ => &[Kind::X509Csr, Kind::X509Keygen, Kind::Jwt],
        };
        for &kind in kinds {
            if !args.wants_case(t, kind) {
                continue;
            }
            let mut r = issuance_run(target, t, kind, args.clients, args.seconds, &csrs).await?;
            if let Some(us) = r["broker_cpu_us_per_credential"].as_f64() {
                let sig_us = 1e6 / sign_rate;
                r["cpu_per_credential_in_signatures"] =
                    json!((us / sig_us * 100.0).round() / 100.0);
            }
            runs.push(r);
        }
    }
    Ok(Value::Array(runs))
}
