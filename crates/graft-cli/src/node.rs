//! `graft run` and `graft serve`: a node serving the HTTP API until Ctrl-C.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Result};
use graft::{Node, NodeLimits, SandboxSpec};
use tokio::net::TcpListener;

use crate::{render, watch, Reported};

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
    listener: TcpListener,
    metrics_bind: Option<&str>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let live = graft_http::Live::new(node.clone());
    let app = graft_http::router_with(node.clone(), live.clone());
    // A scrape-only listener shares the API's counters (same `Live`).
    let scraper = match metrics_bind {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| {
                anyhow!("cannot listen on {addr} for --metrics-bind: {e}; pick another HOST:PORT")
            })?;
            println!("metrics on http://{}/metrics", l.local_addr()?);
            let router = graft_http::metrics_router(live);
            Some(tokio::spawn(async move { axum::serve(l, router).await }))
        }
        None => None,
    };
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown_signal().await;
    eprintln!("graft: stopping (terminate callbacks run) …");
    node.stop_all(STOP_TIMEOUT).await;
    let _ = stop_tx.send(());
    // In-flight requests get a moment; idle connections close at once.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(s) = scraper {
        s.abort();
    }
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

pub async fn serve(
    bind: &str,
    port: u16,
    metrics_bind: Option<&str>,
    caps: NodeLimits,
) -> Result<()> {
    let node = node(caps);
    let listener = listen(bind, port).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}  (API: http://{addr}/api/v1, no sandboxes yet)");
    serve_until_signal(node, listener, metrics_bind).await
}

pub async fn run(
    dir: &Path,
    bind: &str,
    port: u16,
    metrics_bind: Option<&str>,
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
    let listener = listen(bind, port).await?;
    let addr = listener.local_addr()?;
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
            "listening on http://{addr}  (API: http://{addr}/api/v1, watching {})",
            dir.join("src").display()
        );
        Some(w)
    } else {
        println!("listening on http://{addr}  (API: http://{addr}/api/v1)");
        None
    };
    let result = serve_until_signal(node, listener, metrics_bind).await;
    drop(watcher);
    result
}
