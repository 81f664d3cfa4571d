//! Unix-socket connections that every gRPC stack can use, whatever `:authority` it sends.
//!
//! gRPC clients name a Unix socket target in `:authority` in different ways: grpc-go and grpc-js
//! send `localhost`, gRPC C-core (Python `grpcio`, py-spiffe, C++, Ruby, PHP) the percent-encoded
//! socket path (`tmp%2Fdir%2Fworkload.sock`), grpc-java/Netty the raw path
//! (`/run/ephemera/workload.sock`). h2 parses `:authority` as a URI authority and resets the
//! stream with `PROTOCOL_ERROR` when it is not one (hyperium/h2#487), so C-core and Java clients
//! could not call the broker at all; h2 has no option to accept them.
//!
//! [`Normalized`] sits between the Unix socket and the HTTP/2 server and rewrites the request
//! header blocks the client sends: each HEADERS (+ CONTINUATION) block is decoded with the
//! connection's HPACK decoder and encoded again with an encoder of our own, replacing an
//! `:authority` that is not a valid URI authority with `localhost`. On such a connection every
//! block is re-encoded, not only the rewritten ones: HPACK's dynamic table is connection state
//! shared by the client's encoder and the server's decoder, so the server must see one
//! consistent encoding (ours) for the whole connection. The connection's first request
//! decides: when it already names a usable authority (or none), as grpc-go, grpc-js and tonic
//! do, that block and everything after it pass through untouched, at no cost; gRPC stacks name
//! the same authority on every request of a channel. Everything else (the preface, SETTINGS, DATA, PING, WINDOW_UPDATE,
//! RST_STREAM, GOAWAY, PRIORITY) passes through unchanged, and the server-to-client direction is
//! untouched. Only Unix listeners are wrapped: on TCP the authority is a host name.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const FRAME_HEADER: usize = 9;
/// HEADERS frame type.
const HEADERS: u8 = 0x1;
/// CONTINUATION frame type.
const CONTINUATION: u8 = 0x9;
/// END_STREAM flag.
const END_STREAM: u8 = 0x1;
/// END_HEADERS flag.
const END_HEADERS: u8 = 0x4;
/// PADDED flag.
const PADDED: u8 = 0x8;
/// PRIORITY flag.
const PRIORITY: u8 = 0x20;
/// Largest frame the server accepts (its SETTINGS_MAX_FRAME_SIZE, h2's default): the largest
/// we forward, and the most we buffer of one frame from the client.
const MAX_FRAME: usize = 16_384;
/// Largest header block accepted, HPACK-encoded (the server's header list limit bounds the
/// decoded size too).
const MAX_BLOCK: usize = 64 * 1024;
/// What replaces an `:authority` that is not a URI authority.
const LOCALHOST: &[u8] = b"localhost";

/// A Unix-socket connection whose request header blocks carry an `:authority` h2 accepts.
pub struct Normalized<S> {
    inner: S,
    /// Bytes read from the client, not yet forwarded.
    raw: BytesMut,
    /// Bytes ready for the server.
    ready: BytesMut,
    preface_seen: bool,
    /// Nothing more to rewrite: everything passes through untouched (not HTTP/2 with prior
    /// knowledge, or a client whose first request already had a usable `:authority`).
    passthrough: bool,
    /// Whether this connection's header blocks are re-encoded (decided by its first block).
    rewriting: bool,
    /// A header block being assembled from HEADERS and CONTINUATION frames.
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// The client closed its side; what is buffered is still delivered.
    eof: bool,
}

/// A HEADERS frame waiting for the CONTINUATION frames that finish its block.
struct PendingBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, to forward unchanged if the connection needs no rewriting.
    original: Vec<u8>,
}

fn malformed(why: &str) -> io::Error {
    tracing::debug!(
        reason = why,
        "unix connection closed: malformed HTTP/2 from the client"
    );
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

impl<S> Normalized<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        // The client's encoder may use at most the table the server announced (h2's default).
        decoder.set_max_allowed_table_size(4096);
        Self {
            inner,
            raw: BytesMut::with_capacity(8 * 1024),
            ready: BytesMut::new(),
            preface_seen: false,
            passthrough: false,
            rewriting: false,
            pending: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            eof: false,
        }
    }

    /// Moves every complete unit in `raw` to `ready`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.passthrough {
            let all = self.raw.split();
            self.ready.extend_from_slice(&all);
            return Ok(());
        }
        if !self.preface_seen {
            let n = self.raw.len().min(PREFACE.len());
            if self.raw[..n] != PREFACE[..n] {
                // Not HTTP/2 with prior knowledge: let the server answer it as it would.
                self.passthrough = true;
                let all = self.raw.split();
                self.ready.extend_from_slice(&all);
                return Ok(());
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            let preface = self.raw.split_to(PREFACE.len());
            self.ready.extend_from_slice(&preface);
            self.preface_seen = true;
        }
        while self.raw.len() >= FRAME_HEADER {
            let len = usize::from(self.raw[0]) << 16
                | usize::from(self.raw[1]) << 8
                | usize::from(self.raw[2]);
            if len > MAX_FRAME {
                // The server refuses it (FRAME_SIZE_ERROR): forward the rest for it to do so,
                // rather than buffer a frame of up to 16 MiB.
                self.passthrough = true;
                let all = self.raw.split();
                self.ready.extend_from_slice(&all);
                return Ok(());
            }
            if self.raw.len() < FRAME_HEADER + len {
                return Ok(());
            }
            let kind = self.raw[3];
            let flags = self.raw[4];
            let stream = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                & 0x7fff_ffff;
            let frame = self.raw.split_to(FRAME_HEADER + len);
            match (kind, &mut self.pending) {
                (HEADERS, None) => {
                    let mut payload = &frame[FRAME_HEADER..];
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = usize::from(*payload.first().ok_or_else(|| malformed("padding"))?);
                        payload = &payload[1..];
                    }
                    let priority = if flags & PRIORITY != 0 {
                        let p: [u8; 5] = payload
                            .get(..5)
                            .and_then(|p| p.try_into().ok())
                            .ok_or_else(|| malformed("priority"))?;
                        payload = &payload[5..];
                        Some(p)
                    } else {
                        None
                    };
                    if pad > payload.len() {
                        return Err(malformed("padding longer than the frame"));
                    }
                    let block = payload[..payload.len() - pad].to_vec();
                    let original = if self.rewriting {
                        Vec::new()
                    } else {
                        frame.to_vec()
                    };
                    self.pending = Some(PendingBlock {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        priority,
                        block,
                        original,
                    });
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                (CONTINUATION, Some(p)) if p.stream == stream => {
                    if p.block.len() + len > MAX_BLOCK {
                        return Err(malformed("header block too large"));
                    }
                    p.block.extend_from_slice(&frame[FRAME_HEADER..]);
                    if !self.rewriting {
                        p.original.extend_from_slice(&frame);
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                (_, Some(_)) => {
                    return Err(malformed("a header block was interrupted by another frame"));
                }
                (_, None) => self.ready.extend_from_slice(&frame),
            }
        }
        Ok(())
    }

    /// Decodes the finished block, normalizes `:authority`, and queues it re-encoded.
    fn finish_block(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                // Bounded as it decodes: a small block of references to large table entries
                // must not expand into a large list (an HPACK bomb).
                size += name.len() + value.len() + 32;
                if size <= MAX_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| malformed(&format!("HPACK: {e:?}")))?;
        if size > MAX_BLOCK {
            return Err(malformed("header list too large"));
        }
        if !self.rewriting {
            // The connection's first request decides: a client that names a usable authority
            // (grpc-go, grpc-js, tonic: `localhost`) or none does so on every request, and its
            // connection passes through untouched from here on, the first block as it came;
            // a client that names its socket path (C-core, grpc-java) has every block rewritten.
            let usable = headers
                .iter()
                .all(|(name, value)| name.as_slice() != b":authority" || is_authority(value));
            if usable {
                self.ready.extend_from_slice(&p.original);
                self.passthrough = true;
                let rest = self.raw.split();
                self.ready.extend_from_slice(&rest);
                return Ok(());
            }
            self.rewriting = true;
        }
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && !is_authority(value) {
                tracing::debug!(
                    stream = p.stream,
                    "rewrote a non-URI :authority (a Unix socket path) to localhost"
                );
                *value = LOCALHOST.to_vec();
            }
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.write_block(&p, &block);
        Ok(())
    }

    /// Queues `block` as one HEADERS frame and as many CONTINUATION frames as it needs.
    fn write_block(&mut self, p: &PendingBlock, block: &[u8]) {
        let prefix = if p.priority.is_some() { 5 } else { 0 };
        let first = block.len().min(MAX_FRAME - prefix);
        let mut flags = if p.end_stream { END_STREAM } else { 0 };
        if p.priority.is_some() {
            flags |= PRIORITY;
        }
        if first == block.len() {
            flags |= END_HEADERS;
        }
        self.frame_header(prefix + first, HEADERS, flags, p.stream);
        if let Some(priority) = p.priority {
            self.ready.extend_from_slice(&priority);
        }
        self.ready.extend_from_slice(&block[..first]);
        let mut rest = &block[first..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let flags = if n == rest.len() { END_HEADERS } else { 0 };
            self.frame_header(n, CONTINUATION, flags, p.stream);
            self.ready.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    fn frame_header(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        // `len` is at most MAX_FRAME, well within 24 bits.
        let len = u32::try_from(len).unwrap_or(0);
        self.ready.put_uint(u64::from(len), 3);
        self.ready.put_u8(kind);
        self.ready.put_u8(flags);
        self.ready.put_u32(stream);
    }
}

/// Runs client bytes, arriving in pieces of `chunk` bytes, through the rewriting and returns
/// what the server would read (for tests and the `unix_h2` fuzz target).
pub fn rewrite(input: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
    let mut n = Normalized::new(());
    for piece in input.chunks(chunk.max(1)) {
        n.raw.extend_from_slice(piece);
        n.process()?;
    }
    Ok(n.ready.to_vec())
}

/// Whether h2 accepts `value` as `:authority` (the same parser it uses).
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalized<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.passthrough && this.raw.is_empty() {
                // Nothing to rewrite any more: straight from the socket into the server's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let got = read.filled();
                    if got.is_empty() {
                        this.eof = true;
                        // An unfinished frame at EOF is forwarded for the server to judge.
                        let rest = this.raw.split();
                        this.ready.extend_from_slice(&rest);
                        continue;
                    }
                    this.raw.extend_from_slice(got);
                    this.process()?;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalized<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Normalized<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn headers_of(server_bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut rest = &server_bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let (mut blocks, mut block) = (Vec::new(), Vec::new());
        while rest.len() >= FRAME_HEADER {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let mut payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                assert_eq!(flags & PADDED, 0, "padding is dropped");
                if kind == HEADERS && flags & PRIORITY != 0 {
                    payload = &payload[5..];
                }
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    let mut list = Vec::new();
                    decoder
                        .decode_with_cb(&block, |k, v| list.push((k.into_owned(), v.into_owned())))
                        .unwrap();
                    blocks.push(list);
                    block.clear();
                }
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        blocks
    }

    #[test]
    fn header_blocks_are_reencoded_with_a_usable_authority_whatever_their_framing() {
        let mut client = loona_hpack::Encoder::new();
        let socket_path: &[u8] = b"/run/ephemera/workload.sock";
        let first = client.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID"),
            (b":authority", socket_path),
            (b"workload.spiffe.io", b"true"),
        ]);
        // The second block reuses the client's dynamic table (the authority by index).
        let second = client.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":path", b"/grpc.health.v1.Health/Check"),
            (b":authority", socket_path),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        // HEADERS, padded and with priority, split by a CONTINUATION.
        let (a, b) = first.split_at(first.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        for chunk in [1, 7, 4096] {
            let out = rewrite(&input, chunk).unwrap();
            let blocks = headers_of(&out);
            assert_eq!(blocks.len(), 2, "chunk {chunk}");
            for block in &blocks {
                let authority = block.iter().find(|(k, _)| k == b":authority").unwrap();
                assert_eq!(authority.1, b"localhost");
            }
            assert!(blocks[0].contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
            // Everything but the header frames passes through byte for byte.
            assert!(
                out.windows(14)
                    .any(|w| w == frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]))
            );
        }
        // A block interrupted by another frame is refused, never passed on half-rewritten.
        let mut broken = PREFACE.to_vec();
        broken.extend(frame(HEADERS, 0, 1, a));
        broken.extend(frame(0x0, 0, 1, &[0; 5]));
        assert!(rewrite(&broken, 4096).is_err());
    }

    #[test]
    fn a_connection_whose_first_request_names_a_usable_authority_passes_through_untouched() {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        for (stream, path) in [(1, &b"/a"[..]), (3, b"/b")] {
            let block = client.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":path", path),
                (b":authority", b"localhost"),
            ]);
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        for chunk in [1, 5, 4096] {
            assert_eq!(rewrite(&input, chunk).unwrap(), input, "chunk {chunk}");
        }
    }

    #[test]
    fn mangled_input_is_refused_or_passed_on_but_never_panics() {
        let mut client = loona_hpack::Encoder::new();
        let block = client.encode([(&b":authority"[..], &b"/x.sock"[..]), (b":path", b"/a")]);
        let mut valid = PREFACE.to_vec();
        valid.extend(frame(
            HEADERS,
            END_HEADERS | PADDED,
            1,
            &[[2u8].as_slice(), &block, &[0, 0]].concat(),
        ));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            let mut input = valid.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = PREFACE.len() + (seed as usize) % (input.len() - PREFACE.len());
                input[at] = (seed >> 32) as u8;
            }
            let _ = rewrite(&input, 1 + (seed as usize % 13));
        }
    }

    #[test]
    fn authorities_h2_refuses_are_the_ones_rewritten() {
        assert!(is_authority(b"localhost"));
        assert!(is_authority(b"127.0.0.1:8443"));
        assert!(!is_authority(b"/run/ephemera/workload.sock"));
        assert!(!is_authority(b"tmp%2Fdir%2Fworkload.sock"));
    }
}
