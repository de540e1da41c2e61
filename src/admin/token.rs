//! `halyard admin token`: an admin token for the HTTP API, stored hashed like user tokens.

use super::Context;

/// Issues an admin token valid for `ttl` (e.g. "30d", "12h") and returns it with its expiry:
/// the only time it is shown.
pub async fn issue_admin(ctx: &Context<'_>, ttl: &str) -> anyhow::Result<Vec<String>> {
    let secs = halyard_xep::host::parse_duration_secs(ttl).map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(secs > 0, "--ttl must be a positive duration such as 30d");
    let (token, rec) = crate::store::tokens::issue(ctx.stores.tokens.as_ref(), None, secs).await?;
    tracing::info!(ttl_secs = secs, "admin API token issued");
    Ok(vec![
        token,
        format!(
            "expires {} (use it as: Authorization: Bearer <token>)",
            halyard_xep::datetime::format_datetime(rec.expires.saturating_mul(1_000_000))
        ),
    ])
}
