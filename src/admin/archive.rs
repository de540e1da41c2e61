//! `halyard archive size|prune`.

use anyhow::Context as _;

use super::user::account_jid;
use super::Context;

pub async fn size(ctx: &Context<'_>, raw: &str) -> anyhow::Result<Vec<String>> {
    let jid = account_jid(ctx, raw)?;
    let (n, bytes) = ctx.stores.archive.size(&jid).await?;
    Ok(vec![format!("{jid}: {n} messages, {bytes} bytes")])
}

/// Removes archive entries older than `older_than` (e.g. "30d") for one account or all.
pub async fn prune(
    ctx: &Context<'_>,
    raw: Option<&str>,
    older_than: &str,
) -> anyhow::Result<Vec<String>> {
    let secs =
        halyard_xep::host::parse_duration_secs(older_than).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        secs > 0,
        "--older-than must be a positive duration such as 30d"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock")?;
    let cutoff = (now.as_micros() as u64).saturating_sub(secs.saturating_mul(1_000_000));
    let jid = raw.map(|r| account_jid(ctx, r)).transpose()?;
    let n = ctx.stores.archive.prune(jid.as_ref(), cutoff).await?;
    ctx.stores.durable.wait().await?;
    Ok(vec![format!("removed {n} messages")])
}
