//! Connection bounds for the gRPC listeners: a connection that never starts HTTP/2, or that
//! sits idle with no request open, is closed, so that idle or stalled clients cannot hold file
//! descriptors and memory forever. Requests doing their job — however long-lived (`KeepAlive`,
//! `Watch`, `FetchX509SVID`, SDS streams) — are never cut: a connection with an open stream is
//! not idle. Dead peers under a long stream are found by HTTP/2 keep-alive pings (the server's
//! `http2_keepalive_interval`), not here.
//!
//! [`Guarded`] follows the HTTP/2 frames in both directions just enough to know which streams
//! are open: a stream opens with the client's HEADERS and closes with the server's END_STREAM
//! or a RST_STREAM from either side. It never buffers or changes a byte.

use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// HEADERS frame type.
const HEADERS: u8 = 0x1;
/// RST_STREAM frame type.
const RST_STREAM: u8 = 0x3;
/// END_STREAM flag.
const END_STREAM: u8 = 0x1;
/// The client connection preface.
const PREFACE_LEN: usize = 24;
/// Most streams tracked per connection (h2's own concurrency limit is far lower).
const MAX_TRACKED: usize = 4096;

/// How long a gRPC connection may take to start, and stay idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBounds {
    /// From accept (or the end of the TLS handshake) to the whole HTTP/2 preface.
    pub preface_timeout: Duration,
    /// With no stream open for this long, the connection is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnectionBounds {
    fn default() -> Self {
        Self {
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Where one direction's frame parser is.
#[derive(Default)]
struct FrameCursor {
    /// Bytes of the current frame header seen so far.
    header: [u8; 9],
    filled: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
}

impl FrameCursor {
    /// Feeds `bytes`; calls `frame(type, flags, stream)` at each frame header.
    fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == 9 {
                let h = self.header;
                self.payload_left =
                    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.filled = 0;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                frame(h[3], h[4], stream);
            }
        }
    }
}

/// A gRPC connection under [`ConnectionBounds`].
pub struct Guarded<S> {
    inner: S,
    bounds: ConnectionBounds,
    /// Preface bytes still expected from the client (0 once HTTP/2 has started).
    preface_left: usize,
    reads: FrameCursor,
    writes: FrameCursor,
    open: HashSet<u32>,
    /// Since when no stream has been open.
    idle_since: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    /// Guards a connection that has just been accepted (after its TLS handshake).
    pub fn new(inner: S, bounds: ConnectionBounds) -> Self {
        let now = Instant::now();
        Self {
            inner,
            bounds,
            preface_left: PREFACE_LEN,
            reads: FrameCursor::default(),
            writes: FrameCursor::default(),
            open: HashSet::new(),
            idle_since: now,
            timer: Box::pin(tokio::time::sleep_until(now + bounds.preface_timeout)),
        }
    }

    fn saw_read(&mut self, bytes: &[u8]) {
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        if self.preface_left == 0 && skip > 0 {
            // HTTP/2 has started: from now on, only idleness closes the connection.
            self.idle_since = Instant::now();
            self.rearm();
        }
        let open = &mut self.open;
        // A client's HEADERS opens a stream (its END_STREAM only half-closes it: the server has
        // not answered yet); bytes on no stream (SETTINGS, PING) do not make a connection busy.
        self.reads
            .feed(&bytes[skip..], |kind, _, stream| match kind {
                HEADERS if stream != 0 && open.len() < MAX_TRACKED => {
                    open.insert(stream);
                }
                RST_STREAM => {
                    open.remove(&stream);
                }
                _ => {}
            });
    }

    fn saw_write(&mut self, bytes: &[u8]) {
        let was_busy = !self.open.is_empty();
        let open = &mut self.open;
        self.writes.feed(bytes, |kind, flags, stream| {
            if kind == RST_STREAM || flags & END_STREAM != 0 && stream != 0 {
                open.remove(&stream);
            }
        });
        if was_busy && self.open.is_empty() {
            self.idle_since = Instant::now();
            self.rearm();
        }
    }

    fn rearm(&mut self) {
        let deadline = if self.preface_left > 0 {
            self.timer.deadline()
        } else {
            self.idle_since + self.bounds.idle_timeout
        };
        self.timer.as_mut().reset(deadline);
    }

    /// Whether the connection is to be closed now (the timer fired and its bound holds).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.preface_left > 0 {
                tracing::debug!("connection closed: no HTTP/2 preface within the bound");
                return true;
            }
            if self.open.is_empty() {
                let deadline = self.idle_since + self.bounds.idle_timeout;
                if Instant::now() >= deadline {
                    tracing::debug!("connection closed: idle with no open stream");
                    return true;
                }
                self.timer.as_mut().reset(deadline);
            } else {
                // Busy: look again one idle period from now.
                let next = Instant::now() + self.bounds.idle_timeout;
                self.timer.as_mut().reset(next);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            // End of stream: the server closes the connection as if the client had.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.saw_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.saw_write(&buf[..n]);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
