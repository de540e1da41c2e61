//! `halyard`: the server and its admin commands.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use halyard::admin::{self, Request};
use halyard::config::Config;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "halyard", version, about = "An XMPP server")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Clone)]
struct Global {
    /// Configuration file (default: ./config.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve this domain only (replaces `domains`).
    #[arg(long, global = true, value_name = "D")]
    domain: Option<String>,
    /// Data directory (replaces `data_dir`).
    #[arg(long = "data-dir", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log level or filter (replaces `log`).
    #[arg(long, global = true, value_name = "LEVEL")]
    log: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Inspect and prune message archives (XEP-0313).
    #[command(subcommand)]
    Archive(ArchiveCmd),
    /// Administration of the HTTP API.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Validate the configuration and say how to fix what is wrong.
    CheckConfig,
    /// Make the running server re-read its TLS certificates (as SIGHUP does); it keeps the old
    /// ones if the new ones cannot be loaded.
    ReloadCerts,
    /// Write every account and everything it owns to a XEP-0227 file, through a running
    /// server's admin socket or directly from the store (docs/export-format.md).
    Export {
        /// The file to write (created with mode 0600), or `-` for stdout.
        file: String,
    },
    /// Load a XEP-0227 file into the store (running or not). Refused, with nothing written, if
    /// the file is malformed or names an account the store already holds data for.
    Import {
        /// The file to read, or `-` for stdin.
        file: String,
    },
}

#[derive(Args, Default)]
struct ServeArgs {
    /// STARTTLS c2s listener address (repeatable; `none` turns it off).
    #[arg(long = "c2s", value_name = "ADDR")]
    c2s: Vec<String>,
    /// Direct TLS c2s listener address (repeatable; `none` turns it off).
    #[arg(long = "c2s-tls", value_name = "ADDR")]
    c2s_tls: Vec<String>,
    /// HTTP listener address (repeatable; `none` turns it off).
    #[arg(long = "http", value_name = "ADDR")]
    http: Vec<String>,
    /// HTTPS listener address (repeatable; `none` turns it off).
    #[arg(long = "https", value_name = "ADDR")]
    https: Vec<String>,
}

#[derive(Subcommand)]
enum ArchiveCmd {
    /// Number of archived messages and their stored bytes for an account.
    Size { jid: String },
    /// Remove archived messages older than a duration, for one account or (--all) everyone.
    Prune {
        /// The account; omit with --all.
        jid: Option<String>,
        /// Prune every account's archive.
        #[arg(long, conflicts_with = "jid")]
        all: bool,
        /// Age beyond which messages go, e.g. 30d, 12w, 720h.
        #[arg(long, value_name = "DURATION")]
        older_than: String,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Issue an admin token for the HTTP API (/api/v1/admin/...), printed once; only its hash
    /// is stored.
    Token {
        /// How long it stays valid, e.g. 30d, 12h.
        #[arg(long, default_value = "30d", value_name = "DURATION")]
        ttl: String,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create an account (reads the password from stdin without --password).
    Add {
        jid: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Change an account's password and end its live sessions.
    Passwd {
        jid: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Remove an account and everything it owns, ending its live sessions.
    Remove { jid: String },
    /// List accounts, one JID per line.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halyard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the config per the CLI contract: an explicit --config must exist; otherwise
/// ./config.toml if present; otherwise defaults.
fn load_config(g: &Global) -> anyhow::Result<(Config, String)> {
    let (mut cfg, source) = match &g.config {
        Some(p) => {
            anyhow::ensure!(
                p.exists(),
                "config file {} does not exist (check --config)",
                p.display()
            );
            (Config::load(p)?, p.display().to_string())
        }
        None if Path::new("config.toml").exists() => (
            Config::load(Path::new("config.toml"))?,
            "config.toml".into(),
        ),
        None => {
            let mut c = Config::default();
            c.resolve_paths(&std::env::current_dir().unwrap_or_default());
            (c, "built-in defaults".into())
        }
    };
    if let Some(d) = &g.domain {
        cfg.domains = vec![d.clone()];
    }
    if let Some(d) = &g.data_dir {
        cfg.data_dir = std::env::current_dir().unwrap_or_default().join(d);
    }
    if let Some(l) = &g.log {
        cfg.log = l.clone();
    }
    cfg.validate()?;
    Ok((cfg, source))
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn parse_addrs(values: &[String], flag: &str) -> anyhow::Result<Option<Vec<SocketAddr>>> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for v in values {
        if v == "none" {
            continue;
        }
        out.push(v.parse().with_context(|| {
            format!("--{flag} {v:?} is not an address: use IP:PORT, e.g. 127.0.0.1:5222, or none")
        })?);
    }
    Ok(Some(out))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.cmd.unwrap_or(Cmd::Serve(ServeArgs::default())) {
        Cmd::Serve(args) => {
            let (mut cfg, source) = load_config(&cli.global)?;
            init_logging(&cfg.log);
            tracing::info!(config = %source, "configuration loaded");
            if let Some(a) = parse_addrs(&args.c2s, "c2s")? {
                cfg.listeners.c2s = a;
            }
            if let Some(a) = parse_addrs(&args.c2s_tls, "c2s-tls")? {
                cfg.listeners.c2s_tls = a;
            }
            if let Some(a) = parse_addrs(&args.http, "http")? {
                cfg.listeners.http = a;
            }
            if let Some(a) = parse_addrs(&args.https, "https")? {
                cfg.listeners.https = a;
            }
            rt.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    wait_for_signal().await;
                    let _ = tx.send(true);
                });
                halyard::serve(cfg, rx, None).await
            })
        }
        Cmd::CheckConfig => {
            let (cfg, source) = load_config(&cli.global)?;
            println!("{source}: OK (domains: {})", cfg.domains.join(", "));
            Ok(())
        }
        Cmd::User(u) => admin(&rt, &cli.global, user_request(u)?),
        Cmd::Archive(a) => admin(&rt, &cli.global, archive_request(a)?),
        Cmd::Admin(AdminCmd::Token { ttl }) => admin(&rt, &cli.global, Request::AdminToken { ttl }),
        Cmd::ReloadCerts => admin(&rt, &cli.global, Request::ReloadCerts),
        Cmd::Export { file } => portable(&rt, &cli.global, true, &file),
        Cmd::Import { file } => portable(&rt, &cli.global, false, &file),
    }
}

fn user_request(u: UserCmd) -> anyhow::Result<Request> {
    Ok(match u {
        UserCmd::Add { jid, password } => Request::UserAdd {
            jid,
            password: password_or_stdin(password)?,
        },
        UserCmd::Passwd { jid, password } => Request::UserPasswd {
            jid,
            password: password_or_stdin(password)?,
        },
        UserCmd::Remove { jid } => Request::UserRemove { jid },
        UserCmd::List => Request::UserList,
    })
}

fn archive_request(a: ArchiveCmd) -> anyhow::Result<Request> {
    Ok(match a {
        ArchiveCmd::Size { jid } => Request::ArchiveSize { jid },
        ArchiveCmd::Prune {
            jid,
            all,
            older_than,
        } => {
            anyhow::ensure!(
                all || jid.is_some(),
                "name an account, or pass --all to prune every archive"
            );
            Request::ArchivePrune { jid, older_than }
        }
    })
}

/// Runs an admin command and prints its answer; errors go to stderr with a non-zero exit.
fn admin(rt: &tokio::runtime::Runtime, global: &Global, req: Request) -> anyhow::Result<()> {
    let (cfg, _) = load_config(global)?;
    init_logging(global.log.as_deref().unwrap_or("warn"));
    let resp = rt.block_on(admin_request(&cfg, req))?;
    for l in &resp.lines {
        println!("{l}");
    }
    match resp.error {
        Some(e) => anyhow::bail!(e),
        None => Ok(()),
    }
}

/// `export` / `import`: the path is made absolute before it goes to a server; `-` goes through a
/// temporary file in the data directory, which the server can reach.
fn portable(
    rt: &tokio::runtime::Runtime,
    global: &Global,
    export: bool,
    file: &str,
) -> anyhow::Result<()> {
    let (cfg, _) = load_config(global)?;
    init_logging(global.log.as_deref().unwrap_or("warn"));
    let stdio = file == "-";
    let path = if stdio {
        halyard::store::create_data_dir(&cfg.data_dir)?;
        let what = if export { "export" } else { "import" };
        std::env::current_dir()
            .context("the current directory")?
            .join(&cfg.data_dir)
            .join(format!(".{what}-{}.xml", std::process::id()))
    } else {
        std::env::current_dir()
            .context("the current directory")?
            .join(file)
    };
    let run = || -> anyhow::Result<()> {
        if stdio && !export {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            std::io::copy(&mut std::io::stdin().lock(), &mut f).context("reading stdin")?;
        }
        let p = path
            .to_str()
            .with_context(|| format!("{} is not a UTF-8 path", path.display()))?
            .to_string();
        let req = if export {
            Request::Export { path: p }
        } else {
            Request::Import { path: p }
        };
        let resp = rt.block_on(admin_request(&cfg, req))?;
        if stdio && export && resp.error.is_none() {
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut f, &mut out).context("writing stdout")?;
            std::io::Write::flush(&mut out).context("writing stdout")?;
        }
        for l in &resp.lines {
            // With the data on stdout, the summary goes to stderr.
            if stdio && export {
                eprintln!("{}", l.replace(&path.display().to_string(), "stdout"));
            } else {
                println!("{l}");
            }
        }
        match resp.error {
            Some(e) => anyhow::bail!(e),
            None => Ok(()),
        }
    };
    let r = run();
    if stdio {
        let _ = std::fs::remove_file(&path);
    }
    r
}

/// Through a running server's socket when there is one, else directly on the store.
async fn admin_request(cfg: &Config, req: Request) -> anyhow::Result<admin::Response> {
    if let Some(r) = admin::socket::request(&cfg.data_dir, &req).await? {
        return Ok(r);
    }
    let stores =
        halyard::store::Stores::open_sled(&cfg.data_dir, cfg.group_commit(), cfg.cache_bytes())?;
    let ctx = admin::Context {
        stores: &stores,
        server: None,
        domains: &cfg.domains,
        scram_iterations: cfg.auth.scram_iterations,
    };
    let resp = admin::execute(&ctx, req).await;
    (stores.flush)()?;
    Ok(resp)
}

fn password_or_stdin(p: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = p {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(
        !pw.is_empty(),
        "no password given: pass --password PW or write it on stdin"
    );
    Ok(pw)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
