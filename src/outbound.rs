//! The bounded queue between the router and one session's writer (see [`crate::sessions`]).
//!
//! Hand-written because an idle session must stay small and every bound session has one of
//! these, while none of the channels at hand allocate only what is queued:
//!
//! - tokio's `mpsc` (used before) allocates a block of 32 slots per channel as soon as it is
//!   created (~1.5 KB per idle session with its cache-padded state, measured with massif);
//! - `futures::channel::mpsc` bounds the queue at "buffer + one per sender", and the sessions
//!   table clones a sender for every stanza it queues, so its bound is not one; it also
//!   allocates two stub nodes per channel and a node per message;
//! - `async-channel` (concurrent-queue) allocates every slot of the bound up front;
//! - flume allocates a hook per waiting receive, which every idle session would hold.
//!
//! This one is a `VecDeque` behind a mutex, allocated while something is queued and freed again
//! when the receiver empties it, plus one waker: about 100 bytes per idle session. The lock is
//! held only to push or pop (never across an `.await`), and contention is low: one receiver,
//! and senders that each push one item.
//!
//! Semantics are those of tokio's bounded `mpsc` that the session code relies on:
//! [`Sender::try_send`] fails with [`TrySendError::Full`] at the bound and with
//! [`TrySendError::Closed`] once the receiver is closed or dropped; [`Receiver::recv`] returns
//! `None` once every sender is gone and the queue is empty, and is cancel-safe (an item is
//! removed only when the future returns it); [`Receiver::close`] refuses further items and
//! what is queued is then drained with [`Receiver::try_recv`]. One addition:
//! [`Sender::send_past_bound`] queues an item past the bound by at most one, for the message
//! that tells a session to close, which must not wait for room (tokio's queue needed a task
//! waiting in `send().await` for that).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A queue of at most `bound` items (at least 1). Nothing is allocated for the items until one
/// is queued.
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            closed: false,
            waker: None,
        }),
        senders: AtomicUsize::new(1),
        bound: bound.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Live [`Sender`]s; the receiver sees the end of the queue when it reaches 0.
    senders: AtomicUsize,
    bound: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    /// The receiver was closed or dropped: nothing more is accepted.
    closed: bool,
    /// The receiver waiting in [`Receiver::recv`], if any.
    waker: Option<Waker>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves the queue consistent (every operation on it is
        // a single push, pop or flag change), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] refused an item; the item is given back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds its bound.
    Full(T),
    /// The receiver was closed or dropped.
    Closed(T),
}

/// Why [`Receiver::try_recv`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued now.
    Empty,
    /// Nothing queued, and every sender is gone.
    Disconnected,
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or closed.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.push(item, self.shared.bound)
    }

    /// Queues `item` even when the queue is full, by at most one item past the bound (so a
    /// second call on a full queue is refused with [`TrySendError::Full`]).
    pub fn send_past_bound(&self, item: T) -> Result<(), TrySendError<T>> {
        self.push(item, self.shared.bound + 1)
    }

    fn push(&self, item: T, limit: usize) -> Result<(), TrySendError<T>> {
        let waker = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(TrySendError::Closed(item));
            }
            if st.queue.len() >= limit {
                return Err(TrySendError::Full(item));
            }
            st.queue.push_back(item);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver was closed or dropped.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last sender: a waiting receiver has to learn that the queue ended. Taking the
            // lock after the decrement orders this after any check the receiver made under it.
            let waker = self.shared.lock().waker.take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("bound", &self.shared.bound)
            .finish_non_exhaustive()
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item; `None` once the queue is empty and every sender is gone (or the receiver
    /// was closed and drained). Cancel-safe.
    pub fn recv(&mut self) -> Recv<'_, T> {
        Recv { rx: self }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut st = self.shared.lock();
        match pop(&mut st) {
            Some(item) => Ok(item),
            None if st.closed || self.shared.senders.load(Ordering::Acquire) == 0 => {
                Err(TryRecvError::Disconnected)
            }
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuses every further item (senders get [`TrySendError::Closed`]); what is already
    /// queued stays, for [`Self::try_recv`] or [`Self::recv`].
    pub fn close(&mut self) {
        self.shared.lock().closed = true;
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut st = self.shared.lock();
        if let Some(item) = pop(&mut st) {
            return Poll::Ready(Some(item));
        }
        if st.closed || self.shared.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        match &mut st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Pops the next item; an emptied queue gives its buffer back, so that an idle session holds
/// none (a busy one allocates again on its next push: cheap next to serialising a stanza).
fn pop<T>(st: &mut State<T>) -> Option<T> {
    let item = st.queue.pop_front()?;
    if st.queue.is_empty() {
        st.queue = VecDeque::new();
    }
    Some(item)
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.waker = None;
            std::mem::take(&mut st.queue)
        };
        // Dropped outside the lock.
        drop(queued);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("bound", &self.shared.bound)
            .finish_non_exhaustive()
    }
}

/// The future of [`Receiver::recv`].
pub struct Recv<'a, T> {
    rx: &'a mut Receiver<T>,
}

impl<T> Future for Recv<'_, T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounded_fifo() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(4));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn past_the_bound_by_one_at_most() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        assert_eq!(tx.send_past_bound(3), Ok(()));
        assert_eq!(tx.send_past_bound(4), Err(TrySendError::Full(4)));
        assert_eq!(tx.try_send(5), Err(TrySendError::Full(5)));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Ok(3));
        // Below the bound it is an ordinary push.
        assert_eq!(tx.send_past_bound(6), Ok(()));
        assert_eq!(rx.try_recv(), Ok(6));
    }

    #[test]
    fn emptied_queue_frees_its_buffer() {
        let (tx, mut rx) = channel(8);
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(rx.shared.lock().queue.capacity() > 0);
        rx.try_recv().unwrap();
        assert!(rx.shared.lock().queue.capacity() > 0);
        rx.try_recv().unwrap();
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
    }

    #[test]
    fn close_refuses_then_drains() {
        let (tx, mut rx) = channel(4);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
        assert_eq!(tx.send_past_bound(3), Err(TrySendError::Closed(3)));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn dropped_receiver_closes_and_frees() {
        let item = Arc::new(());
        let (tx, rx) = channel(4);
        tx.try_send(item.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&item), 1, "queued items are dropped");
        assert!(matches!(tx.try_send(item), Err(TrySendError::Closed(_))));
    }

    #[tokio::test]
    async fn recv_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        tx2.try_send(2).unwrap();
        drop(tx2);
        // Queued items come out before the end.
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn recv_after_close_drains_then_ends() {
        let (tx, mut rx) = channel(4);
        tx.try_send(1).unwrap();
        rx.close();
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
        drop(tx);
    }

    #[tokio::test]
    async fn waiting_receiver_is_woken_by_a_push_and_by_the_last_drop() {
        let (tx, mut rx) = channel::<u32>(4);
        let task = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(7).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the receiver was woken")
            .unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (tx, mut rx) = channel::<u32>(4);
        // A recv dropped while pending loses nothing and leaves no stale state behind.
        for _ in 0..3 {
            tokio::select! {
                biased;
                _ = rx.recv() => panic!("nothing was queued"),
                _ = std::future::ready(()) => {}
            }
        }
        tx.try_send(1).unwrap();
        // A recv that loses the race to another branch does not take the item.
        tokio::select! {
            biased;
            _ = std::future::ready(()) => {}
            _ = rx.recv() => panic!("the first branch is ready"),
        }
        assert_eq!(rx.recv().await, Some(1));
    }

    #[test]
    fn many_senders_across_threads() {
        let (tx, mut rx) = channel::<u64>(1_000_000);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        tx.try_send(t * 100_000 + i).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut last = [None::<u64>; 4];
        let mut n = 0;
        rt.block_on(async {
            while let Some(v) = rx.recv().await {
                let t = (v / 100_000) as usize;
                // Each sender's items arrive in its order.
                assert!(last[t].is_none_or(|l| l < v));
                last[t] = Some(v);
                n += 1;
            }
        });
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(n, 40_000);
    }
}
