//! `graft run` and `graft serve`: a node serving the HTTP API until Ctrl-C.
//!
//! Both open the node's data directory (`graft run DIR`: `DIR/.graft`;
//! `graft serve`: the default data directory), make sure its admin token
//! file exists, and serve every route behind the trust middleware, over TLS
//! when given a certificate.

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
    pub port: u16,
    pub allow_hosts: Vec<String>,
    /// `--tls-cert` and `--tls-key`.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub projects_roots: Vec<PathBuf>,
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

/// Opens the node's database in `data_dir`, makes sure the admin token
/// file exists, and loads the node's trust. (The one seam to the node's
/// store: with a durable node the store is the node's own.)
fn open_trust(data_dir: &Path, config: TrustConfig) -> Result<(Arc<Trust>, TokenFile)> {
    let store = Arc::new(
        graft::store::Store::open(data_dir.join("graft.db"))
            .with_context(|| format!("cannot open the node's data in {}", data_dir.display()))?,
    );
    let file = ensure_admin_token_file(data_dir, &store).with_context(|| {
        format!(
            "cannot write the admin token file in {}",
            data_dir.display()
        )
    })?;
    let trust = Trust::new(store, config)
        .with_context(|| format!("cannot read the tokens in {}", data_dir.display()))?;
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

/// Serves the API until Ctrl-C (or SIGTERM), then stops every app in order.
async fn serve_until_signal(
    node: Node,
    trust: Arc<Trust>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = graft_http::router(node.clone(), trust);
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
    eprintln!("graft: stopping (terminate callbacks run) …");
    node.stop_all(STOP_TIMEOUT).await;
    let _ = stop_tx.send(());
    // In-flight requests get a moment; idle connections close at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
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

/// A node with one scheduler thread per core and these caps.
fn node(caps: NodeLimits) -> Node {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    Node::with_limits(threads, caps)
}

fn tls_config(serving: &Serving) -> Result<Option<Arc<rustls::ServerConfig>>> {
    match &serving.tls {
        Some((cert, key)) => Ok(Some(graft_http::tls::server_config(cert, key)?)),
        None => Ok(None),
    }
}

pub async fn serve(serving: Serving, caps: NodeLimits) -> Result<()> {
    let data_dir = crate::datadir::default_data_dir().ok_or_else(|| {
        anyhow!("cannot find the default data directory: set HOME or XDG_DATA_HOME")
    })?;
    let tls = tls_config(&serving)?;
    let (trust, file) = open_trust(&data_dir, serving.trust_config())?;
    let node = node(caps);
    let listener = listen(&serving.bind, serving.port).await?;
    let addr = listener.local_addr()?;
    let scheme = serving.scheme();
    println!("listening on {scheme}://{addr}  (API: {scheme}://{addr}/api/v1, no sandboxes yet)");
    println!("{}", token_banner(&file));
    serve_until_signal(node, trust, listener, tls).await
}

pub async fn run(
    dir: &Path,
    mut serving: Serving,
    caps: NodeLimits,
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
    let (trust, file) = open_trust(
        &crate::datadir::project_data_dir(dir),
        serving.trust_config(),
    )?;
    let id = spec.id.clone();
    let sources = spec.modules.clone();
    let files: std::collections::BTreeMap<String, String> = spec
        .files
        .iter()
        .map(|(m, p)| (m.clone(), watch::shown(p)))
        .collect();
    let node = node(caps);
    let n = node.clone();
    let created = tokio::task::spawn_blocking(move || n.create_sandbox(spec)).await?;
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
    println!("✓ sandbox `{id}` started: {}", modules.join(", "));
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
    let result = serve_until_signal(node, trust, listener, tls).await;
    drop(watcher);
    result
}
