//! Keeps the store away from a full or read-only disk. sled 0.34 treats a failed log write as
//! fatal: it records a global error that fails every later write until the database is reopened
//! (seen here on a full tmpfs: after space was freed, nothing could be stored any more). So the
//! server refuses writes itself, with the same errors a full disk would give (through
//! [`super::faults`]), while the data folder's file system has less than
//! `storage.min_free_mb` free or is read-only, and lets them through again once it has room:
//! sled never meets the full disk, and the server recovers without a restart.
//!
//! The free space is read with `fs2` (statvfs), which sled already depends on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

use super::faults::{Fault, FaultSwitch};

/// How often the file system is looked at.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The state the file system holding `dir` calls for: a full disk below `min_free` bytes free
/// (`Some(NoSpace)` stays on until there are half as many again), read-only when a file there
/// cannot be opened for writing.
pub fn assess(dir: &Path, probe: &Path, min_free: u64, now: Option<Fault>) -> Option<Fault> {
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(probe);
    if let Err(e) = writable {
        if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
            return Some(Fault::ReadOnly);
        }
    }
    let free = match fs2::available_space(dir) {
        Ok(f) => f,
        // Cannot tell: keep the state we have.
        Err(_) => return now,
    };
    let resume_at = min_free.saturating_add(min_free / 2);
    match now {
        Some(Fault::NoSpace) if free < resume_at => Some(Fault::NoSpace),
        _ if free < min_free => Some(Fault::NoSpace),
        _ => None,
    }
}

/// Watches `data_dir` every [`INTERVAL`] until shutdown, switching writes off and on.
pub fn spawn(
    data_dir: PathBuf,
    min_free: u64,
    switch: FaultSwitch,
    mut shutdown: watch::Receiver<bool>,
) {
    let probe = data_dir.join(".write-probe");
    tokio::spawn(async move {
        loop {
            let now = switch.get();
            let dir = data_dir.clone();
            let p = probe.clone();
            let next = tokio::task::spawn_blocking(move || assess(&dir, &p, min_free, now))
                .await
                .unwrap_or(now);
            if next != now {
                let free_mb = fs2::available_space(&data_dir).unwrap_or(0) / (1024 * 1024);
                match next {
                    Some(Fault::NoSpace) => tracing::error!(
                        free_mb,
                        min_free_mb = min_free / (1024 * 1024),
                        dir = %data_dir.display(),
                        "the data folder's disk is nearly full: refusing writes (messages to offline users, roster changes, archive copies, accounts) until it has room"
                    ),
                    Some(Fault::ReadOnly) => tracing::error!(
                        dir = %data_dir.display(),
                        "the data folder is read-only: refusing writes until it is writable"
                    ),
                    None => {
                        tracing::warn!(free_mb, "the data folder has room again: writes resume")
                    }
                }
                switch.set(next);
            }
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = crate::server::until_shutdown(&mut shutdown) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_below_the_reserve_until_half_as_much_again_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join(".probe");
        let free = fs2::available_space(dir.path()).unwrap();
        assert_eq!(assess(dir.path(), &probe, free / 4, None), None);
        assert_eq!(
            assess(dir.path(), &probe, free.saturating_mul(2), None),
            Some(Fault::NoSpace)
        );
        // Hysteresis: above the reserve but below 1.5x it, a full disk stays full.
        let min = free / 10 * 9;
        assert_eq!(
            assess(dir.path(), &probe, min, Some(Fault::NoSpace)),
            Some(Fault::NoSpace)
        );
        assert_eq!(assess(dir.path(), &probe, min, None), None);
    }
}
