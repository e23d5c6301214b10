//! A deadline on writes: a peer that stops reading an answer fails the
//! write after a while instead of holding the connection, its task and the
//! unsent part of the answer forever.
//!
//! [`WriteDeadline`] wraps a transport. A write, flush or shutdown that
//! stays pending for longer than the deadline fails with
//! [`std::io::ErrorKind::TimedOut`]; any progress restarts the clock. Reads
//! pass through untouched (their deadlines belong to the protocol: header
//! timeouts, idle timeouts).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A transport whose writes must make progress within a deadline.
#[derive(Debug)]
pub struct WriteDeadline<IO> {
    inner: IO,
    deadline: Duration,
    /// Armed while a write is pending; reused (reset) across writes.
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl<IO> WriteDeadline<IO> {
    /// Wraps `inner`; pending writes fail after `deadline` without progress.
    pub fn new(inner: IO, deadline: Duration) -> Self {
        Self { inner, deadline, timer: Box::pin(tokio::time::sleep(deadline)), armed: false }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !self.armed {
                    self.armed = true;
                    let at = Instant::now() + self.deadline;
                    self.timer.as_mut().reset(at);
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.armed = false;
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading")))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_fails_the_write_and_one_that_reads_does_not() {
        // A pipe of 1 KiB that nobody reads: the second write stays pending.
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut io = WriteDeadline::new(ours, Duration::from_secs(10));
        io.write_all(&[0u8; 1024]).await.unwrap();
        let err = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // A slow reader that keeps reading: every write completes, however
        // long the whole transfer takes.
        let (ours, mut slow) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut total = 0;
            while total < 64 * 1024 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                total += slow.read(&mut buf).await.unwrap();
            }
            total
        });
        let mut io = WriteDeadline::new(ours, Duration::from_secs(10));
        io.write_all(&vec![0u8; 64 * 1024]).await.unwrap();
        drop(io);
        assert!(reader.await.unwrap() >= 64 * 1024);
        let _ = theirs.read(&mut [0u8; 1]).await;
    }
}
