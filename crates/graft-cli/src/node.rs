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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use graft::{Node, NodeLimits, SandboxSpec};
use graft_http::trust::{ensure_admin_token_file, TokenFile, Trust, TrustConfig};
use tokio::net::TcpListener;

use crate::{render, watch, Reported};

/// How `run` and `serve` face the network (checked by `main`).
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
    /// In memory only; the admin token file still goes to `token_dir`.
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
    /// ephemeral node the one it would have used (the token is new at each
    /// start, since the ephemeral database is).
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
async fn open_node(caps: NodeLimits, data: &DataChoice) -> Result<Node> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let builder = Node::builder().threads(threads).limits(caps);
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
    println!("✓ backed up {} to {}", db.display(), dest.display());
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
            println!("metrics on http://{}/metrics", l.local_addr()?);
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
    eprintln!("graft: stopping: no new requests, final checkpoint, then terminate callbacks …");
    let _ = stop_tx.send(());
    // In-flight requests get a moment; idle connections close at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(s) = scraper {
        s.abort();
    }
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || n.shutdown()).await;
    node.stop_all(STOP_TIMEOUT).await;
    eprintln!("graft: stopped");
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
    let node = open_node(caps, &data).await?;
    let (trust, file) = open_trust(&node, data.token_dir(), serving.trust_config())?;
    let listener = listen(&serving.bind, serving.port).await?;
    let addr = listener.local_addr()?;
    let scheme = serving.scheme();
    let ids = node.sandbox_ids();
    let sandboxes = if ids.is_empty() {
        "no sandboxes yet".to_string()
    } else {
        format!("restored: {}", ids.join(", "))
    };
    println!(
        "listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1, {sandboxes}; {})",
        data.describe()
    );
    println!("{}", token_banner(&file));
    serve_until_signal(node, trust, listener, tls, serving.metrics_bind.as_deref()).await
}

pub async fn run(
    dir: &Path,
    mut serving: Serving,
    caps: NodeLimits,
    data: DataChoice,
    debounce_ms: Option<u64>,
) -> Result<()> {
    if !dir.join("graft.toml").is_file() {
        return Err(anyhow!(
            "{} is not a Graft project (no graft.toml); create one with `graft new {}`",
            dir.display(),
            dir.display()
        ));
    }
    let spec = SandboxSpec::from_dir(dir)?;
    // `graft run DIR` may create sandboxes from DIR through the API.
    serving.projects_roots.push(dir.to_owned());
    let tls = tls_config(&serving)?;
    let node = open_node(caps, &data).await?;
    let (trust, file) = open_trust(&node, data.token_dir(), serving.trust_config())?;
    let id = spec.id.clone();
    let sources = spec.modules.clone();
    let files: std::collections::BTreeMap<String, String> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), watch::shown(p)))
        .collect();
    let restored = node.sandbox(&id).ok();
    let n = node.clone();
    let created = match restored {
        // The project's sandbox came back from the data directory; then
        // what src/ holds goes live, as the watcher would have done: a
        // reload that is `unchanged` when the files match the running
        // version, re-uses a kept version's number when they match it, and
        // is a new version when they were edited while the node was down.
        Some(sb) => match apply_settings(&node, spec).await {
            Ok(rebuilt) => restore_sources(rebuilt.unwrap_or(sb), sources.clone()).await,
            Err(e) => Err(e),
        },
        None => tokio::task::spawn_blocking(move || n.create_sandbox(spec)).await?,
    };
    let sandbox = match created {
        Ok(sb) => sb,
        Err(e) => {
            let err = graft_http::ApiError::from(e);
            eprint!(
                "{}",
                render::error(&err.body()["error"], &|m| files.get(m).cloned())
            );
            eprintln!("error: sandbox `{id}` could not start; fix the error and run again");
            return Err(Reported.into());
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), sandbox.wait_app_started()).await {
        Ok(Ok(_)) | Err(_) => {}
        Ok(Err(e)) => {
            let why = e.to_string();
            eprintln!(
                "warning: the app did not start: {}\n  = note: the API still serves; fix and save to reload",
                render::escape(&why, render::Lines::Keep)
            );
        }
    }
    let listener = listen(&serving.bind, serving.port).await?;
    let addr = listener.local_addr()?;
    let scheme = serving.scheme();
    let modules: Vec<&str> = sources.keys().map(String::as_str).collect();
    println!(
        "✓ sandbox `{id}` started: {}  ({})",
        modules.join(", "),
        data.describe()
    );
    let watcher = if let Some(ms) = debounce_ms {
        let w = watch::start(
            dir,
            sandbox.clone(),
            &sources,
            std::time::Duration::from_millis(ms),
        )?;
        println!(
            "listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1, watching {})",
            dir.join("src").display()
        );
        Some(w)
    } else {
        println!("listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1)");
        None
    };
    println!("{}", token_banner(&file));
    let result =
        serve_until_signal(node, trust, listener, tls, serving.metrics_bind.as_deref()).await;
    drop(watcher);
    result
}

/// Applies the project's current `graft.toml` (entry, entry args, limits,
/// capabilities) to the sandbox the node restored, durably: the stored
/// settings are the last run's, and an edit made while the node was down
/// must not be ignored. `None` when nothing changed.
async fn apply_settings(
    node: &graft::Node,
    spec: graft::SandboxSpec,
) -> graft::Result<Option<graft::Sandbox>> {
    let id = spec.id.clone();
    let n = node.clone();
    let rebuilt = tokio::task::spawn_blocking(move || n.reconfigure_sandbox(spec))
        .await
        .map_err(|e| graft::Error::InvalidInput(format!("applying graft.toml: {e}")))??;
    if rebuilt.is_some() {
        println!("✓ sandbox `{id}` restored with the settings of graft.toml, which changed since the last run (its app restarted)");
    }
    Ok(rebuilt)
}

/// Brings a restored sandbox up to the sources on disk.
async fn restore_sources(
    sb: graft::Sandbox,
    sources: std::collections::BTreeMap<String, String>,
) -> graft::Result<graft::Sandbox> {
    let report = match sb.reload(sources, graft::ReloadOptions::default()).await {
        Ok(r) => r,
        Err(e) => {
            let why = e.to_string();
            eprintln!(
                "warning: the files in src/ do not load: {}\n  = note: the restored version keeps running; fix and save to reload",
                crate::render::escape(&why, crate::render::Lines::Keep)
            );
            return Ok(sb);
        }
    };
    let changed: Vec<String> = report
        .modules
        .iter()
        .map(|m| format!("{} v{} → v{}", m.name, m.from, m.to))
        .collect();
    if changed.is_empty() {
        println!("✓ sandbox `{}` restored; its files did not change", sb.id());
    } else {
        println!(
            "✓ sandbox `{}` restored and reloaded from its files: {}",
            sb.id(),
            changed.join(", ")
        );
    }
    Ok(sb)
}
