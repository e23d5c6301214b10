//! Shedding streams whose reader stopped reading.
//!
//! All streams of a QUIC connection share its receive window, and bytes a
//! stream has received but nobody has read keep holding that credit. A
//! client that requests a large response and never reads it parks up to a
//! stream window of data in the tunnel; a few dozen such clients (one
//! connection window's worth) stall every stream of the tunnel, new ones
//! included. The same holds on the agent for an upstream that stops
//! reading an upload.
//!
//! [`StallGuard`] wraps the writer a stream's data is copied into (the
//! client's or the upstream's TCP connection). A write that makes no
//! progress for [`STALL_AFTER`] registers the stream in its connection's
//! [`StallBudget`]; any progress deregisters it. The budget admits as many
//! stalled streams as fit in three quarters of the connection window; past
//! that the longest-stalled stream is shed: its pending write fails with
//! [`is_shed`] true, and the caller resets both sides, which hands the
//! stream's unread bytes back to the connection window. A slow reader that
//! still reads is never stalled for long, and stalled readers are only shed
//! when they would otherwise stall the tunnel for everybody.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a write may make no progress before its stream counts as
/// stalled. Short, because until then a stream can hold a window of credit
/// unseen; it costs a legitimate slow reader nothing unless the budget is
/// exceeded.
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// The stalled streams of one QUIC connection.
#[derive(Debug)]
pub struct StallBudget {
    max_stalled: usize,
    stall_after: Duration,
    state: Mutex<BudgetState>,
    shed_total: AtomicU64,
}

#[derive(Debug, Default)]
struct BudgetState {
    next_id: u64,
    /// Registration order: the first entry has been stalled longest.
    stalled: BTreeMap<u64, Arc<ShedFlag>>,
}

#[derive(Debug, Default)]
struct ShedFlag {
    shed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl ShedFlag {
    fn shed(&self) {
        self.shed.store(true, Ordering::SeqCst);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            waker.wake();
        }
    }

    fn set_waker(&self, waker: &Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
    }

    fn is_shed(&self) -> bool {
        self.shed.load(Ordering::SeqCst)
    }
}

impl StallBudget {
    /// A budget admitting `max_stalled` stalled streams (at least one).
    pub fn new(max_stalled: usize) -> Arc<Self> {
        Self::with_stall_after(max_stalled, STALL_AFTER)
    }

    /// The same with another stall delay than [`STALL_AFTER`].
    pub fn with_stall_after(max_stalled: usize, stall_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            max_stalled: max_stalled.max(1),
            stall_after,
            state: Mutex::default(),
            shed_total: AtomicU64::new(0),
        })
    }

    /// A budget for a connection with these receive windows: as many full
    /// stream windows as fit in three quarters of the connection window, so
    /// a quarter stays for the streams that flow.
    pub fn for_windows(connection_window: u64, stream_window: u32) -> Arc<Self> {
        let fit = connection_window.saturating_mul(3) / 4 / u64::from(stream_window.max(1));
        Self::new(usize::try_from(fit).unwrap_or(usize::MAX))
    }

    /// Streams stalled right now.
    pub fn stalled(&self) -> usize {
        self.lock().stalled.len()
    }

    /// Streams shed so far.
    pub fn shed_total(&self) -> u64 {
        self.shed_total.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a stalled stream; sheds the longest-stalled ones beyond
    /// the budget (never the newcomer: it is the most recent).
    fn enter(self: &Arc<Self>, waker: &Waker) -> StallTicket {
        let flag = Arc::new(ShedFlag::default());
        flag.set_waker(waker);
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.stalled.insert(id, flag.clone());
        while state.stalled.len() > self.max_stalled {
            let Some((_, oldest)) = state.stalled.pop_first() else { break };
            self.shed_total.fetch_add(1, Ordering::Relaxed);
            oldest.shed();
        }
        StallTicket { id, flag, budget: self.clone() }
    }
}

/// A stream's place in the budget while it is stalled.
#[derive(Debug)]
struct StallTicket {
    id: u64,
    flag: Arc<ShedFlag>,
    budget: Arc<StallBudget>,
}

impl Drop for StallTicket {
    fn drop(&mut self) {
        self.budget.lock().stalled.remove(&self.id);
    }
}

/// The error a shed stream's pending write fails with.
#[derive(Debug, thiserror::Error)]
#[error("reader stalled while the tunnel's window was needed; stream shed")]
pub struct Shed;

/// Whether `error` is a [`StallGuard`] shedding its stream.
pub fn is_shed(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Shed>())
}

/// A writer (and reader, passed through) whose stalled writes count
/// against a [`StallBudget`].
#[derive(Debug)]
pub struct StallGuard<W> {
    inner: W,
    budget: Arc<StallBudget>,
    /// Kept across writes (reset, not reallocated: writes to a busy socket
    /// go pending often).
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the write pending now.
    timing: bool,
    ticket: Option<StallTicket>,
}

impl<W> StallGuard<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, budget: Arc<StallBudget>) -> Self {
        Self { inner, budget, timer: None, timing: false, ticket: None }
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Runs a write-side poll, tracking how long it stays pending.
    fn track<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut W, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.ticket.as_ref().is_some_and(|t| t.flag.is_shed()) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Shed)));
        }
        match poll(&mut self.inner, cx) {
            Poll::Ready(result) => {
                self.timing = false;
                self.ticket = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                if let Some(ticket) = &self.ticket {
                    ticket.flag.set_waker(cx.waker());
                    // Shed between the check above and the new waker.
                    if ticket.flag.is_shed() {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Shed)));
                    }
                } else {
                    let deadline = tokio::time::Instant::now() + self.budget.stall_after;
                    let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if !self.timing {
                        timer.as_mut().reset(deadline);
                        self.timing = true;
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        self.ticket = Some(self.budget.enter(cx.waker()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallGuard<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.track(cx, |w, cx| Pin::new(w).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.track(cx, |w, cx| Pin::new(w).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.track(cx, |w, cx| Pin::new(w).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W: AsyncRead + Unpin> AsyncRead for StallGuard<W> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Stall delay in these tests (real time).
    const AFTER: Duration = Duration::from_millis(50);

    /// A pipe whose reader never reads: writes stall once its buffer is full.
    fn stuck_writer() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(1024)
    }

    #[test]
    fn budget_fits_three_quarters_of_the_window() {
        assert_eq!(StallBudget::for_windows(32 << 20, 1 << 20).max_stalled, 24);
        assert_eq!(StallBudget::for_windows(1 << 20, 1 << 20).max_stalled, 1);
        assert_eq!(StallBudget::for_windows(0, 0).max_stalled, 1);
    }

    #[tokio::test]
    async fn the_longest_stalled_stream_is_shed_past_the_budget() {
        let budget = StallBudget::with_stall_after(2, AFTER);
        let mut peers = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..3 {
            let (w, r) = stuck_writer();
            peers.push(r);
            let mut guard = StallGuard::new(w, budget.clone());
            writes.push(tokio::spawn(async move { guard.write_all(&[0u8; 4096]).await }));
            // Registration order = stall order.
            tokio::time::sleep(AFTER * 3).await;
        }
        let first = writes.remove(0).await.unwrap().unwrap_err();
        assert!(is_shed(&first), "{first}");
        assert_eq!(budget.shed_total(), 1);
        assert_eq!(budget.stalled(), 2);
        // The other two keep waiting; once their readers read, they finish
        // and leave the budget.
        for (w, peer) in writes.into_iter().zip(peers.iter_mut().skip(1)) {
            let mut sink = vec![0u8; 4096];
            let reader = async {
                let mut got = 0;
                while got < 4096 {
                    got += tokio::io::AsyncReadExt::read(peer, &mut sink).await.unwrap();
                }
            };
            let (written, ()) = tokio::join!(w, reader);
            written.unwrap().unwrap();
        }
        assert_eq!(budget.stalled(), 0);
        assert_eq!(budget.shed_total(), 1);
    }

    #[tokio::test]
    async fn progress_resets_the_stall_clock() {
        let budget = StallBudget::with_stall_after(1, AFTER);
        let (w, mut r) = stuck_writer();
        let mut guard = StallGuard::new(w, budget.clone());
        // A reader that takes a little every half stall period: never
        // stalled, however long the transfer.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let mut got = 0;
            while got < 16 * 1024 {
                tokio::time::sleep(AFTER / 2).await;
                got += tokio::io::AsyncReadExt::read(&mut r, &mut buf).await.unwrap();
            }
        });
        guard.write_all(&vec![1u8; 16 * 1024]).await.unwrap();
        reader.await.unwrap();
        assert_eq!(budget.shed_total(), 0);
        assert_eq!(budget.stalled(), 0);
    }
}
