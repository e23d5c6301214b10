//! Bidirectional copy that holds no buffer while a connection is idle.
//!
//! tokio's `copy_bidirectional` owns one zeroed buffer per direction for
//! the connection's whole life, so every idle keep-alive connection keeps
//! both resident. Here each read goes into a scratch buffer on the stack of
//! the poll, and only bytes the writer could not take at once are kept,
//! in a buffer sized to them that is dropped once written. An idle
//! connection holds nothing but its state.
//!
//! Half-close and errors work as in `copy_bidirectional`: a read EOF shuts
//! the other side's write half down (after every byte read before it is
//! written), writes are flushed before the task waits for more input, and
//! the first error, `Interrupted` included, ends both directions.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read per poll (on the stack; the spill is sized to what is left).
pub const SCRATCH: usize = 64 * 1024;

/// One direction's state.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet written, and how many of them were written.
    spill: Option<(Box<[u8]>, usize)>,
    /// The reader reached EOF.
    eof: bool,
    /// The writer was shut down: this direction is finished.
    done: bool,
    /// Bytes written since the last flush.
    need_flush: bool,
    /// Bytes copied.
    copied: u64,
}

impl Direction {
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if let Some((bytes, written)) = &mut self.spill {
                while *written < bytes.len() {
                    let n = ready!(w.as_mut().poll_write(cx, &bytes[*written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *written += n;
                    self.copied += n as u64;
                    self.need_flush = true;
                }
                self.spill = None;
            }
            if self.eof {
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
            let mut buf = ReadBuf::uninit(&mut scratch);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    // Nothing more to read now: push out what was written
                    // before waiting (a TLS writer may hold a record).
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let mut written = 0;
            while written < data.len() {
                match w.as_mut().poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        self.copied += n as u64;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer is full: keep the rest, and only it.
                        self.spill = Some((data[written..].into(), 0));
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both have reached EOF (each EOF
/// shuts the other side's write half down) or one fails. Returns the bytes
/// copied each way, `a` → `b` first.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, backward) {
            (Poll::Ready(forward), Poll::Ready(backward)) => Poll::Ready(Ok((forward, backward))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes `send` then EOF on `io` while reading it to EOF.
    async fn exchange(io: tokio::io::DuplexStream, send: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(io);
        let writer = async {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(writer, r.read_to_end(&mut got));
        read.unwrap();
        got
    }

    /// Copies between two in-memory pipes of `capacity` bytes and returns
    /// what each far end received.
    async fn run(capacity: usize, up: Vec<u8>, down: Vec<u8>) -> (Vec<u8>, Vec<u8>, (u64, u64)) {
        let (client, mut a) = tokio::io::duplex(capacity);
        let (mut b, server) = tokio::io::duplex(capacity);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await.unwrap() });
        let client_side = tokio::spawn(exchange(client, up));
        let at_server = exchange(server, down).await;
        let at_client = client_side.await.unwrap();
        (at_server, at_client, copy.await.unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn copies_both_ways_and_passes_each_eof_on() {
        let (up, down) = (pattern(1000, 1), pattern(3000, 2));
        let (at_server, at_client, counts) = run(64 * 1024, up.clone(), down.clone()).await;
        assert_eq!(at_server, up);
        assert_eq!(at_client, down);
        assert_eq!(counts, (1000, 3000));
    }

    #[tokio::test]
    async fn a_slow_writer_gets_the_rest_from_the_spill_in_order() {
        // Pipes of 100 bytes take a fraction of each read.
        let (up, down) = (pattern(200_000, 3), pattern(300_001, 4));
        let (at_server, at_client, counts) = run(100, up.clone(), down.clone()).await;
        assert_eq!(at_server, up);
        assert_eq!(at_client, down);
        assert_eq!(counts, (200_000, 300_001));
    }

    #[tokio::test]
    async fn empty_streams_finish_at_once() {
        let (at_server, at_client, counts) = run(16, Vec::new(), Vec::new()).await;
        assert!(at_server.is_empty() && at_client.is_empty());
        assert_eq!(counts, (0, 0));
    }

    #[tokio::test]
    async fn a_failed_side_ends_the_copy_with_its_error() {
        let (client, mut a) = tokio::io::duplex(1024);
        let (mut b, server) = tokio::io::duplex(1024);
        drop(client);
        // `a` reads EOF and shuts `b` down; `b` never ends, so the copy
        // is still running; now fail the write side of `a`.
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let (mut server_r, mut server_w) = tokio::io::split(server);
        let mut one = [0u8; 1];
        assert_eq!(server_r.read(&mut one).await.unwrap(), 0, "EOF passed on");
        server_w.write_all(b"to a closed client").await.unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), copy).await.unwrap().unwrap();
        assert!(result.is_err(), "writing to the dropped client fails: {result:?}");
    }
}
