//! `graft run` and `graft serve`: a node serving the HTTP API until Ctrl-C
//! (or SIGTERM).
//!
//! Both open the node's data directory (`graft run DIR`: `DIR/.graft`;
//! `graft serve`: the default data directory; `--data`, `--ephemeral`),
//! restoring what it holds (SPEC §8), make sure its admin token file exists,
//! and serve every route behind the trust middleware, over TLS when given a
//! certificate.
//!
//! Shutdown order: stop taking requests and let in-flight ones finish, write
//! the final checkpoint and close the database (so nothing acknowledged is
//! lost), then stop every app in order (terminate callbacks run).
//!
//! `graft run`'s own steps (its project's sandbox, restored or created, and
//! the checks that keep it from burying stored data) are in `project`; this
//! file holds what both commands share and `serve`.

mod project;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use graft::{Node, NodeLimits, SandboxSpec};
use graft_http::trust::{ensure_admin_token_file, TokenFile, Trust, TrustConfig};
use tokio::net::TcpListener;

use crate::render;

pub use project::run;

/// How `run` and `serve` face the network (checked by `args`).
pub struct Serving {
    pub bind: String,
    /// `--metrics-bind`: a scrape-only listener.
    pub metrics_bind: Option<String>,
    pub port: u16,
    pub allow_hosts: Vec<String>,
    /// `--tls-cert` and `--tls-key`.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub projects_roots: Vec<PathBuf>,
    /// `--audit-messages`.
    pub audit_messages: bool,
}

impl Serving {
    fn trust_config(&self) -> TrustConfig {
        let mut allow_hosts = self.allow_hosts.clone();
        // A node bound to one address may be reached by that address: a
        // literal IP cannot be rebound by DNS.
        if let Ok(ip) = self.bind.parse::<std::net::IpAddr>() {
            if !ip.is_unspecified() && !ip.is_loopback() {
                allow_hosts.push(ip.to_string());
            }
        }
        TrustConfig {
            allow_hosts,
            projects_roots: self.projects_roots.clone(),
            tls: self.tls.is_some(),
            audit_messages: self.audit_messages,
            ..TrustConfig::default()
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Makes sure the admin token file exists in `token_dir` and loads the
/// node's trust from the node's own database (tokens and audit live there).
fn open_trust(
    node: &Node,
    token_dir: &Path,
    config: TrustConfig,
) -> Result<(Arc<Trust>, TokenFile)> {
    let store = node
        .store()
        .cloned()
        .ok_or_else(|| anyhow!("the node has no database for its tokens"))?;
    let file = ensure_admin_token_file(token_dir, &store).with_context(|| {
        format!(
            "cannot write the admin token file in {}",
            token_dir.display()
        )
    })?;
    let trust = Trust::new(store, config)
        .with_context(|| format!("cannot read the tokens in {}", token_dir.display()))?;
    Ok((Arc::new(trust), file))
}

fn token_banner(file: &TokenFile) -> String {
    format!(
        "admin token: {}{}  (graft commands find it; others: GRAFT_TOKEN or --token)",
        file.path.display(),
        if file.created { " (new)" } else { "" }
    )
}

/// How long Ctrl-C waits for each sandbox's app to stop (terminate callbacks).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

async fn listen(bind: &str, port: u16) -> Result<TcpListener> {
    TcpListener::bind((bind, port)).await.map_err(|e| {
        anyhow!("cannot listen on {bind}:{port}: {e}; pick another port with --port (0 picks a free one)")
    })
}

/// Where the node keeps its data.
pub enum DataChoice {
    /// A data directory (created if missing).
    Dir { dir: PathBuf, checkpoint_ms: u64 },
    /// In memory only; the admin token file is still `token_dir`'s (shared
    /// with a persistent node there, never overwritten while valid).
    Ephemeral { token_dir: PathBuf },
}

impl DataChoice {
    /// From `--data`, `--ephemeral` and the subcommand's default directory.
    pub fn from_flags(
        data: Option<PathBuf>,
        ephemeral: bool,
        default: PathBuf,
        checkpoint_ms: u64,
    ) -> DataChoice {
        let dir = data.unwrap_or(default);
        if ephemeral {
            return DataChoice::Ephemeral { token_dir: dir };
        }
        DataChoice::Dir { dir, checkpoint_ms }
    }

    /// Where the admin token file goes: the data directory, or for an
    /// ephemeral node the one it would have used. An ephemeral node's
    /// database is new at each start, so it adopts the token already in the
    /// file rather than writing its own over it: a persistent node on the
    /// same directory keeps its CLI access (`ensure_admin_token_file`).
    fn token_dir(&self) -> &Path {
        match self {
            DataChoice::Dir { dir, .. } => dir,
            DataChoice::Ephemeral { token_dir } => token_dir,
        }
    }

    fn describe(&self) -> String {
        match self {
            DataChoice::Dir { dir, .. } => format!("data in {}", dir.display()),
            DataChoice::Ephemeral { .. } => "ephemeral: nothing is kept".into(),
        }
    }
}

/// Opens the node (restoring what its data directory holds) off the async
/// threads; a database it cannot use stops the command with a clear error.
/// `settings`: the project's sandbox is restored with these (`graft run`).
async fn open_node(
    caps: NodeLimits,
    data: &DataChoice,
    settings: Option<SandboxSpec>,
) -> Result<Node> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut builder = Node::builder().threads(threads).limits(caps);
    if let Some(spec) = settings {
        // `graft run` refuses to start when its sandbox fails to restore,
        // and a refused start leaves the database as it was.
        builder = builder.apply_settings(spec).record_restore_failures(false);
    }
    let (builder, dir) = match data {
        DataChoice::Dir { dir, checkpoint_ms } => (
            builder.data_dir(dir).checkpoint_ms(*checkpoint_ms),
            Some(dir.clone()),
        ),
        DataChoice::Ephemeral { .. } => (builder.ephemeral(), None),
    };
    let opened = tokio::task::spawn_blocking(move || builder.open()).await?;
    opened.map_err(|e| match dir {
        Some(dir) => anyhow!(
            "cannot open the node's data in {}: {e}\n  = help: fix or move that directory, pass another --data DIR, or run with --ephemeral",
            dir.display()
        ),
        None => anyhow!("cannot open an in-memory database: {e}"),
    })
}

/// `graft backup`: a consistent copy of a node's database, live or not.
pub fn backup(data: Option<PathBuf>, dest: &Path) -> Result<()> {
    let dir = match data {
        Some(d) => d,
        None if Path::new(".graft").join(graft::DATABASE_FILE).is_file() => PathBuf::from(".graft"),
        None => crate::datadir::default_data_dir().ok_or_else(|| {
            anyhow!("cannot find the default data directory: set HOME or XDG_DATA_HOME, or pass --data DIR")
        })?,
    };
    let db = dir.join(graft::DATABASE_FILE);
    graft::store::Store::backup_file(&db, dest)
        .map_err(|e| anyhow!("cannot back up {}: {e}", db.display()))?;
    say!("✓ backed up {} to {}", db.display(), dest.display());
    Ok(())
}

/// Serves the API until Ctrl-C (or SIGTERM), then shuts down (module docs).
async fn serve_until_signal(
    node: Node,
    trust: Arc<Trust>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    metrics_bind: Option<&str>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let live = graft_http::Live::new(node.clone());
    let app = graft_http::router_with(node.clone(), trust.clone(), live.clone());
    // A scrape-only listener shares the API's counters (same `Live`).
    let scraper = match metrics_bind {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| {
                anyhow!("cannot listen on {addr} for --metrics-bind: {e}; pick another HOST:PORT")
            })?;
            say!("metrics on http://{}/metrics", l.local_addr()?);
            let router = graft_http::metrics_router(trust, live);
            Some(tokio::spawn(async move {
                axum::serve(
                    l,
                    router.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .await
            }))
        }
        None => None,
    };
    let stopped = async {
        let _ = stop_rx.await;
    };
    let server = tokio::spawn(async move {
        match tls {
            Some(config) => graft_http::tls::serve(listener, app, config, stopped).await,
            None => {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(stopped)
                .await
            }
        }
    });
    shutdown_signal().await;
    warn_line!("graft: stopping: no new requests, final checkpoint, then terminate callbacks …");
    let _ = stop_tx.send(());
    // In-flight requests get a moment; idle connections close at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(s) = scraper {
        s.abort();
    }
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || n.shutdown()).await;
    node.stop_all(STOP_TIMEOUT).await;
    warn_line!("graft: stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn tls_config(serving: &Serving) -> Result<Option<Arc<rustls::ServerConfig>>> {
    match &serving.tls {
        Some((cert, key)) => Ok(Some(graft_http::tls::server_config(cert, key)?)),
        None => Ok(None),
    }
}

pub async fn serve(serving: Serving, caps: NodeLimits, data: DataChoice) -> Result<()> {
    let tls = tls_config(&serving)?;
    let node = open_node(caps, &data, None).await?;
    let (trust, file) = open_trust(&node, data.token_dir(), serving.trust_config())?;
    // A node serving others keeps running; the sandboxes it could not
    // restore stay stored, untouched, and cannot be created over.
    for (id, why) in node.unrestored() {
        warn_line!(
            "warning: sandbox `{id}` could not be restored: {}\n  = note: its kept versions and states stay in the database, untouched; creating a sandbox `{id}` is refused\n  = help: fix the cause and restart, or delete it (`DELETE /api/v1/sandboxes/{id}`; its data is then lost)",
            render::escape(&why, render::Lines::Keep)
        );
    }
    let listener = listen(&serving.bind, serving.port).await?;
    let addr = listener.local_addr()?;
    let scheme = serving.scheme();
    let ids = node.sandbox_ids();
    let sandboxes = if ids.is_empty() {
        "no sandboxes yet".to_string()
    } else {
        format!("restored: {}", ids.join(", "))
    };
    say!(
        "listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1, {sandboxes}; {})",
        data.describe()
    );
    say!("{}", token_banner(&file));
    serve_until_signal(node, trust, listener, tls, serving.metrics_bind.as_deref()).await
}
