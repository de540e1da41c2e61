//! Background maintenance: archive retention (`archive.expire_after`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::server::{until_shutdown, Server};

/// How often retention runs: a tenth of the retention period, between a minute and an hour.
fn interval(expire_secs: u64) -> Duration {
    Duration::from_secs((expire_secs / 10).clamp(60, 3600))
}

/// Prunes archive entries older than `expire_secs`, now and then periodically. Pruning works in
/// small batches and yields between them, so delivery never waits behind it.
pub async fn retention(server: Arc<Server>, expire_secs: u64) {
    let mut shutdown = server.shutdown.clone();
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let cutoff = now.saturating_sub(expire_secs.saturating_mul(1_000_000));
        match server.stores.archive.prune(None, cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "archive retention pruned expired messages"),
            Err(e) => tracing::warn!(error = %e, "archive retention failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval(expire_secs)) => {}
            _ = until_shutdown(&mut shutdown) => return,
        }
    }
}
