//! `halyard user add|passwd|remove|list`.

use anyhow::bail;
use jid::BareJid;

use super::Context;
use crate::sasl;
use crate::stream::{StreamError, StreamErrorKind};

/// Parses and normalises an account JID (RFC 7622), checking it is on a served domain.
pub(super) fn account_jid(ctx: &Context<'_>, raw: &str) -> anyhow::Result<BareJid> {
    let jid = halyard_xep::stanza::parse_bare_jid(raw)
        .map_err(|e| anyhow::anyhow!("{e}: use the form user@domain"))?;
    if jid.node().is_none() {
        bail!("{raw:?} has no user part: use the form user@domain");
    }
    if !ctx.domains.iter().any(|d| d == jid.domain().as_str()) {
        bail!(
            "{} is not a domain this server serves ({}): add it to `domains` in the config or pass --domain",
            jid.domain(),
            ctx.domains.join(", ")
        );
    }
    Ok(jid)
}

fn check_password(password: &str) -> anyhow::Result<()> {
    if password.is_empty() {
        bail!("the password is empty: give a non-empty password");
    }
    Ok(())
}

pub async fn add(ctx: &Context<'_>, raw: &str, password: &str) -> anyhow::Result<Vec<String>> {
    let jid = account_jid(ctx, raw)?;
    check_password(password)?;
    let account = sasl::new_account(password, ctx.scram_iterations)
        .map_err(|e| anyhow::anyhow!("password refused: {}", e.text()))?;
    ctx.stores.accounts.create(&jid, &account).await?;
    tracing::info!(%jid, "account created");
    Ok(Vec::new())
}

pub async fn passwd(ctx: &Context<'_>, raw: &str, password: &str) -> anyhow::Result<Vec<String>> {
    let jid = account_jid(ctx, raw)?;
    check_password(password)?;
    let account = sasl::new_account(password, ctx.scram_iterations)
        .map_err(|e| anyhow::anyhow!("password refused: {}", e.text()))?;
    ctx.stores.accounts.update(&jid, &account).await?;
    end_sessions(ctx, &jid, "the password was changed");
    tracing::info!(%jid, "password changed");
    Ok(Vec::new())
}

pub async fn remove(ctx: &Context<'_>, raw: &str) -> anyhow::Result<Vec<String>> {
    let jid = account_jid(ctx, raw)?;
    ctx.stores.accounts.remove(&jid).await?;
    end_sessions(ctx, &jid, "the account was removed");
    tracing::info!(%jid, "account removed");
    Ok(Vec::new())
}

pub async fn list(ctx: &Context<'_>) -> anyhow::Result<Vec<String>> {
    let mut users: Vec<String> = ctx
        .stores
        .accounts
        .list()
        .await?
        .into_iter()
        .map(|j| j.to_string())
        .collect();
    users.sort();
    Ok(users)
}

fn end_sessions(ctx: &Context<'_>, jid: &BareJid, why: &str) {
    if let Some(server) = ctx.server {
        let n = server.sessions.close_all(
            Some(jid),
            &StreamError::new(StreamErrorKind::NotAuthorized, why),
        );
        if n > 0 {
            tracing::info!(%jid, sessions = n, "ended live sessions");
        }
    }
}
