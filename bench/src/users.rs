//! `halyard-bench users`: creates benchmark accounts directly in a stopped Halyard's store —
//! the same credentials `halyard user add` writes (halyard::sasl::new_account), without a
//! process start and a flush per account. PBKDF2 runs on every core; creations run concurrently
//! so the store's group commit flushes many at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use halyard::store::{AccountError, Stores};
use jid::BareJid;

#[derive(clap::Args)]
pub struct UsersArgs {
    /// Accounts to create: numbers first..first+count.
    #[arg(long)]
    count: u64,
    /// The server's data directory (`data_dir` in its config). The server must be stopped:
    /// the store is opened exclusively.
    #[arg(long)]
    data_dir: PathBuf,
    /// Domain of the accounts (one the server serves).
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Localpart pattern: the account number replaces the placeholder n in braces (as in the
    /// default).
    #[arg(long = "user", default_value = "u{n}")]
    user_pattern: String,
    /// Password of every account.
    #[arg(long, default_value = "pw")]
    password: String,
    /// First account number.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// PBKDF2 iterations (the server's `auth.scram_iterations`; at least 4096).
    #[arg(long, default_value_t = 4096)]
    iterations: u32,
}

pub async fn run(a: UsersArgs) -> anyhow::Result<()> {
    if a.iterations < 4096 {
        anyhow::bail!("--iterations {}: at least 4096 (RFC 7677)", a.iterations);
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let stores =
        Stores::open_sled(&a.data_dir, Duration::from_millis(2), 64 << 20).with_context(|| {
            format!(
                "opening the store in {} (is the server still running?)",
                a.data_dir.display()
            )
        })?;
    let t = Instant::now();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    // Derive credentials on `threads` blocking workers; each sends accounts to the writer.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<(u64, _)>>(1024);
    let password = Arc::new(a.password.clone());
    for w in 0..threads as u64 {
        let tx = tx.clone();
        let password = password.clone();
        let (first, count, iterations) = (a.first, a.count, a.iterations);
        tokio::task::spawn_blocking(move || {
            let mut i = w;
            while i < count {
                let acc = halyard::sasl::new_account(&password, iterations)
                    .map_err(|e| anyhow::anyhow!("password refused: {}", e.text()));
                if tx.blocking_send(acc.map(|acc| (first + i, acc))).is_err() {
                    return;
                }
                i += threads as u64;
            }
        });
    }
    drop(tx);
    let mut created = 0u64;
    let mut existed = 0u64;
    let mut writes = tokio::task::JoinSet::new();
    while let Some(item) = rx.recv().await {
        let (n, acc) = item?;
        let raw = format!(
            "{}@{}",
            a.user_pattern.replace("{n}", &n.to_string()),
            a.domain
        );
        let jid = BareJid::new(&raw).with_context(|| format!("{raw:?} is not a valid JID"))?;
        let stores = stores.clone();
        writes.spawn(async move { stores.accounts.create(&jid, &acc).await });
        // Up to 256 creations waiting on one group commit.
        while writes.len() >= 256 {
            tally(writes.join_next().await, &mut created, &mut existed)?;
        }
    }
    while let Some(r) = writes.join_next().await {
        tally(Some(r), &mut created, &mut existed)?;
    }
    (stores.flush)().context("flushing the store")?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "users: {created} created, {existed} already existed ({}..{} on {}) in {secs:.1} s ({:.0}/s), data dir {}",
        a.user_pattern.replace("{n}", &a.first.to_string()),
        a.user_pattern.replace("{n}", &(a.first + a.count.saturating_sub(1)).to_string()),
        a.domain,
        a.count as f64 / secs.max(1e-9),
        a.data_dir.display()
    );
    Ok(())
}

fn tally(
    r: Option<Result<Result<(), AccountError>, tokio::task::JoinError>>,
    created: &mut u64,
    existed: &mut u64,
) -> anyhow::Result<()> {
    match r {
        Some(Ok(Ok(()))) => *created += 1,
        Some(Ok(Err(AccountError::Exists(_)))) => *existed += 1,
        Some(Ok(Err(e))) => return Err(e).context("creating an account"),
        Some(Err(e)) => return Err(e).context("account creation task"),
        None => {}
    }
    Ok(())
}
