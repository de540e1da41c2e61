//! Group commit: callers that need their writes on disk wait for the next flush, and one flush
//! serves everyone who asked within a short window, so durability costs one fsync per window
//! rather than one per message.

use std::sync::Arc;
use std::time::Duration;

use halyard_xep::host::{StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<StoreError>>>;

/// Writes everything written so far to disk (blocking; run on a blocking thread).
pub type Flusher = Arc<dyn Fn() -> StoreResult<()> + Send + Sync>;

pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommit {
    /// Starts the flusher task for `db`. Writes made before a `wait` call are covered by the
    /// flush that answers it: requests that arrive while a flush runs wait for the next one.
    pub fn start(db: sled::Db, window: Duration) -> GroupCommit {
        // `Tree::flush` on a blocking thread, never `flush_async` (see `super::flush_tree`).
        GroupCommit::start_with(
            window,
            Arc::new(move || {
                db.flush()
                    .map(|_| ())
                    .map_err(super::err("flushing the store"))
            }),
        )
    }

    /// Like [`GroupCommit::start`] with any flush (a wrapped store's, e.g. one that injects
    /// faults). A failed flush fails every waiter of its group with the same error.
    pub fn start_with(window: Duration, flush: Flusher) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                if !window.is_zero() {
                    tokio::time::sleep(window).await;
                }
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let f = flush.clone();
                let r = match tokio::task::spawn_blocking(move || f()).await {
                    Ok(r) => r,
                    Err(e) => Err(StoreError {
                        context: "group commit".into(),
                        source: format!("the flush task failed: {e}").into(),
                    }),
                }
                .map_err(Arc::new);
                if let Err(e) = &r {
                    tracing::error!(error = %e, "group commit: flush failed");
                }
                for w in waiters {
                    let _ = w.send(r.clone());
                }
            }
        });
        GroupCommit { tx }
    }

    /// Asks for a flush without waiting for it: writes made so far reach the disk within the
    /// window (used after live delivery, whose archive copies must not wait for the disk).
    pub fn nudge(&self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.tx.send(tx);
    }

    /// Waits until everything written before this call is on disk.
    pub async fn wait(&self) -> StoreResult<()> {
        let (tx, rx) = oneshot::channel();
        let stopped = || StoreError {
            context: "group commit".into(),
            source: "the flusher has stopped".into(),
        };
        self.tx.send(tx).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(|e| StoreError {
            context: "group commit".into(),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn many_waiters_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let g = std::sync::Arc::new(GroupCommit::start(db.clone(), Duration::from_millis(2)));
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let (g, db) = (g.clone(), db.clone());
            tasks.push(tokio::spawn(async move {
                db.insert(i.to_be_bytes(), &[1u8][..]).unwrap();
                g.wait().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(db);
    }
}
