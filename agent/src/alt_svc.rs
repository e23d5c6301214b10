//! The upstream side of a terminated TLS connection, with `Alt-Svc: h3`
//! added to its first HTTP/1.x response ([`edge_proto::alt_svc`]) so TCP
//! clients learn the node speaks HTTP/3.
//!
//! Reads go through the sans-IO [`HeadInjector`] until it is done (the
//! first final head passed, or given up), then straight to the inner
//! stream; writes always go straight through.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use edge_proto::alt_svc::{HeadInjector, Outcome};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the upstream per poll while a head is still held.
const READ_CHUNK: usize = 8 * 1024;

/// Whether a session that negotiated `alpn` speaks HTTP/1.x (the only
/// HTTP the agent can add a header to without parsing frames).
pub fn speaks_http1(alpn: Option<&[u8]>) -> bool {
    matches!(alpn, None | Some(b"http/1.1" | b"http/1.0"))
}

/// An upstream whose first response may get a header.
#[derive(Debug)]
pub struct AdvertisingUpstream<'a, S> {
    inner: S,
    /// `None` once done: every byte then passes through.
    injector: Option<Box<HeadInjector>>,
    /// Bytes ready for the reader, and how many of them it took.
    out: Vec<u8>,
    taken: usize,
    added: Option<&'a AtomicU64>,
}

impl<'a, S> AdvertisingUpstream<'a, S> {
    /// Wraps `inner`; with `line`, its first final response gets that
    /// header line, and `added` counts it.
    pub fn new(inner: S, line: Option<Vec<u8>>, added: &'a AtomicU64) -> Self {
        let injector = line.map(|line| Box::new(HeadInjector::new(line)));
        Self { inner, injector, out: Vec::new(), taken: 0, added: Some(added) }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn settle(&mut self) {
        if let Some(injector) = self.injector.as_ref().filter(|i| i.is_done()) {
            if injector.outcome() == Outcome::Added {
                if let Some(added) = self.added.take() {
                    added.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.injector = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AdvertisingUpstream<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.out.len() {
                let n = (this.out.len() - this.taken).min(buf.remaining());
                buf.put_slice(&this.out[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.out.len() {
                    // Held only while there is something to hand over.
                    this.out = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let Some(injector) = this.injector.as_mut() else {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                injector.finish(&mut this.out);
                this.settle();
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            injector.push(read.filled(), &mut this.out);
            this.settle();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AdvertisingUpstream<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn through(line: Option<Vec<u8>>, chunks: Vec<&'static [u8]>) -> (Vec<u8>, u64) {
        let (mut far, near) = tokio::io::duplex(64);
        let added = AtomicU64::new(0);
        let mut upstream = AdvertisingUpstream::new(near, line, &added);
        let writer = tokio::spawn(async move {
            for c in chunks {
                far.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        drop(upstream);
        (got, added.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn adds_once_across_small_reads_and_counts_it() {
        let line = edge_proto::alt_svc::h3_header(443);
        let (got, added) = through(
            Some(line),
            vec![b"HTTP/1.1 200 OK\r\nContent-", b"Length: 3\r\n", b"\r\nabcHTTP/1.1 200 OK\r\n\r\n"],
        )
        .await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nAlt-Svc: h3=\":443\"; ma=3600\r\n\r\nabcHTTP/1.1 200 OK\r\n\r\n"
        );
        assert_eq!(added, 1);
    }

    #[tokio::test]
    async fn without_a_line_or_for_other_bytes_nothing_changes() {
        let (got, added) = through(None, vec![b"HTTP/1.1 200 OK\r\n\r\n"]).await;
        assert_eq!((got.as_slice(), added), (&b"HTTP/1.1 200 OK\r\n\r\n"[..], 0));
        let line = edge_proto::alt_svc::h3_header(443);
        let (got, added) = through(Some(line), vec![b"\x16\x03\x01binary", b"more"]).await;
        assert_eq!((got.as_slice(), added), (&b"\x16\x03\x01binarymore"[..], 0));
    }

    #[test]
    fn only_http1_sessions_are_advertised_on() {
        assert!(speaks_http1(None) && speaks_http1(Some(b"http/1.1")));
        assert!(!speaks_http1(Some(b"h2")) && !speaks_http1(Some(b"imap")));
    }
}
