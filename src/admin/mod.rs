//! Administration: the commands behind `halyard user ...` and the socket a running server
//! serves them on (`<data_dir>/admin.sock`, mode 0600).
//!
//! Each command is a [`Request`] executed by [`execute`] against the stores (and, inside a
//! running server, its live sessions). The CLI sends it over the socket when a server is running
//! and runs it in-process on the opened store otherwise, so both paths share one implementation.

pub mod archive;
pub mod portability;
pub mod socket;
pub mod token;
pub mod user;

use serde::{Deserialize, Serialize};

use crate::server::Server;
use crate::store::Stores;

/// One admin command, as sent over the socket (one JSON object per line). Its `Debug` form is
/// the JSON with any password replaced, so that a debug log can never show one.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    UserAdd {
        jid: String,
        password: String,
    },
    UserPasswd {
        jid: String,
        password: String,
    },
    UserRemove {
        jid: String,
    },
    UserList,
    ArchiveSize {
        jid: String,
    },
    ArchivePrune {
        jid: Option<String>,
        older_than: String,
    },
    /// Writes everything stored to a XEP-0227 file at this absolute path.
    Export {
        path: String,
    },
    /// Loads a XEP-0227 file at this absolute path into the store.
    Import {
        path: String,
    },
    /// Issues an admin token for the HTTP API, valid for `ttl` (e.g. "30d").
    AdminToken {
        ttl: String,
    },
    /// Re-reads the TLS certificates of a running server (what SIGHUP does).
    ReloadCerts,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.clone();
        if let Request::UserAdd { password, .. } | Request::UserPasswd { password, .. } = &mut shown
        {
            *password = "<redacted>".into();
        }
        match serde_json::to_string(&shown) {
            Ok(json) => f.write_str(&json),
            Err(_) => f.write_str("<admin request>"),
        }
    }
}

/// The answer: lines for stdout, or an error for stderr.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(lines: Vec<String>) -> Self {
        Response { lines, error: None }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            lines: Vec::new(),
            error: Some(e.to_string()),
        }
    }
}

/// Certificates are read when a server starts: only a running one has any to reload.
async fn reload_certs(ctx: &Context<'_>) -> anyhow::Result<Vec<String>> {
    let Some(server) = ctx.server else {
        anyhow::bail!("no server is running (certificates are read when it starts)");
    };
    let changed = crate::reload_certificates(server).await?;
    Ok(vec![if changed.is_empty() {
        "certificates reloaded (none changed)".to_string()
    } else {
        format!("certificates reloaded; changed: {}", changed.join(", "))
    }])
}

/// What a command can act on: the stores always, the live server when there is one.
pub struct Context<'a> {
    pub stores: &'a Stores,
    pub server: Option<&'a Server>,
    pub domains: &'a [String],
    pub scram_iterations: u32,
}

pub async fn execute(ctx: &Context<'_>, req: Request) -> Response {
    let r = match req {
        Request::UserAdd { jid, password } => user::add(ctx, &jid, &password).await,
        Request::UserPasswd { jid, password } => user::passwd(ctx, &jid, &password).await,
        Request::UserRemove { jid } => user::remove(ctx, &jid).await,
        Request::UserList => user::list(ctx).await,
        Request::ArchiveSize { jid } => archive::size(ctx, &jid).await,
        Request::ArchivePrune { jid, older_than } => {
            archive::prune(ctx, jid.as_deref(), &older_than).await
        }
        Request::Export { path } => portability::export(ctx, &path).await,
        Request::Import { path } => portability::import(ctx, &path).await,
        Request::AdminToken { ttl } => token::issue_admin(ctx, &ttl).await,
        Request::ReloadCerts => reload_certs(ctx).await,
    };
    match r {
        Ok(lines) => Response::ok(lines),
        Err(e) => Response::err(format!("{e:#}")),
    }
}

#[cfg(test)]
mod request_debug_tests {
    use super::Request;

    #[test]
    fn debug_never_shows_a_password() {
        for r in [
            Request::UserAdd {
                jid: "a@example.com".into(),
                password: "hunter2-secret".into(),
            },
            Request::UserPasswd {
                jid: "a@example.com".into(),
                password: "hunter2-secret".into(),
            },
        ] {
            let shown = format!("{r:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(
                shown.contains("a@example.com") && shown.contains("<redacted>"),
                "{shown}"
            );
        }
        let shown = format!("{:?}", Request::UserList);
        assert!(shown.contains("user_list"), "{shown}");
    }
}
