//! `GET /metrics`: the series of SPEC §10 in Prometheus text format, through
//! `prometheus-client`.
//!
//! Invariants:
//! * every label is bounded: sandbox ids and module names (bounded by the
//!   node's limits), a result or an HTTP route *template* and status; never
//!   a pid, a raw path or a message;
//! * counters of things that happen inside a sandbox (reloads, crashes) are
//!   the event log's own counts ([`Node::event_counts`]), read at scrape
//!   time: no sandbox's hot path carries a metrics hook, and a burst that
//!   outruns the log's retention is still counted in full. Reload durations
//!   (a histogram) are observed from the events as the counting task reads
//!   them; figures that are a current value (processes, memory, module
//!   versions, refused messages) are read at scrape time through the
//!   node's public API;
//! * a deleted sandbox's series disappear, and `graft_module_info` holds
//!   exactly the current version of each module (built anew per scrape).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use graft::Node;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::feed::NodeEvent;

/// The content type of the exposition (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape waits for one sandbox's figures before leaving it out.
const SCRAPE_WAIT: Duration = Duration::from_secs(2);

/// Event kinds that are the outcome of a reload (the `result` label).
const RELOAD_RESULTS: &[&str] = &[
    "reload",
    "unchanged",
    "dry_run",
    "abort",
    "rollback",
    "canary_rollback",
    "canary_rollback_failed",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabel {
    sandbox: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    sandbox: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabels {
    sandbox: String,
    module: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: String,
}

fn reload_histogram() -> Histogram {
    // 100 µs to ~26 s, ×4 per bucket.
    Histogram::new(exponential_buckets(0.0001, 4.0, 10))
}

/// The node's metrics: counters fed by events and HTTP requests.
pub struct Metrics {
    started: Instant,
    reload_seconds: Family<SandboxLabel, Histogram, fn() -> Histogram>,
    /// The sandboxes with a `reload_seconds` series, so that a scrape can
    /// drop those of sandboxes gone (even if their deletion's event was
    /// pruned before the counting task read it).
    timed: std::sync::Mutex<std::collections::HashSet<String>>,
    http: Family<HttpLabels, Counter>,
    /// Every event up to this seq has been observed (where a restarted
    /// counting task resumes, so no event is counted twice).
    counted_through: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            reload_seconds: Family::new_with_constructor(reload_histogram),
            timed: Default::default(),
            http: Family::default(),
            counted_through: Default::default(),
        }
    }
}

impl Metrics {
    /// Every event up to this seq has been observed.
    pub fn counted_through(&self) -> u64 {
        self.counted_through
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that every event up to `seq` has been observed.
    pub fn set_counted_through(&self, seq: u64) {
        self.counted_through
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn observe(&self, e: &NodeEvent) {
        let sandbox = SandboxLabel {
            sandbox: e.sandbox.clone(),
        };
        match e.kind.as_str() {
            kind if RELOAD_RESULTS.contains(&kind) => {
                // A canary rollback nests its reload report.
                let report = if kind == "canary_rollback" {
                    &e.detail["report"]
                } else {
                    &e.detail
                };
                if matches!(kind, "reload" | "rollback" | "canary_rollback") {
                    if let Some(s) = reload_seconds(report) {
                        self.timed_lock().insert(e.sandbox.clone());
                        self.reload_seconds.get_or_create(&sandbox).observe(s);
                    }
                }
            }
            "sandbox_deleted" => {
                self.timed_lock().remove(&e.sandbox);
                self.reload_seconds.remove(&sandbox);
            }
            _ => {}
        }
    }

    /// Counts one answered HTTP request.
    fn request(&self, route: &str, status: u16) {
        self.http
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }

    fn timed_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.timed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The whole exposition, with the node's current figures read now.
    pub async fn render(&self, node: &Node) -> String {
        let mut reg = Registry::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let crashes = Family::<SandboxLabel, Counter>::default();
        for c in node.event_counts() {
            if RELOAD_RESULTS.contains(&c.kind.as_str()) {
                reloads
                    .get_or_create(&ResultLabels {
                        sandbox: c.sandbox,
                        result: c.kind,
                    })
                    .inc_by(c.count);
            } else if c.kind == "crash" {
                crashes
                    .get_or_create(&SandboxLabel { sandbox: c.sandbox })
                    .inc_by(c.count);
            }
        }
        reg.register(
            "graft_reloads",
            "Reloads by outcome (reload, unchanged, dry_run, abort, rollback, canary_rollback …)",
            reloads,
        );
        reg.register(
            "graft_reload_duration_seconds",
            "Time of a committed reload: compile and checks plus the swap",
            self.reload_seconds.clone(),
        );
        reg.register("graft_process_crashes", "Processes that crashed", crashes);
        reg.register(
            "graft_http_requests",
            "HTTP requests by route template and status",
            self.http.clone(),
        );
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        uptime.set(self.started.elapsed().as_secs_f64());
        reg.register(
            "graft_uptime_seconds",
            "Seconds since the API started",
            uptime,
        );

        let sandboxes = Gauge::<i64>::default();
        let processes = Family::<SandboxLabel, Gauge>::default();
        let memory = Family::<SandboxLabel, Gauge>::default();
        let mailbox_full = Family::<SandboxLabel, Counter>::default();
        let modules = Family::<ModuleLabels, Gauge>::default();
        let ids = node.sandbox_ids();
        self.timed_lock().retain(|id| {
            let live = ids.contains(id);
            if !live {
                self.reload_seconds.remove(&SandboxLabel {
                    sandbox: id.clone(),
                });
            }
            live
        });
        sandboxes.set(i64::try_from(ids.len()).unwrap_or(i64::MAX));
        for id in ids {
            let Ok(sb) = node.sandbox(&id) else { continue };
            let label = SandboxLabel {
                sandbox: id.clone(),
            };
            if let Ok(Ok(info)) = tokio::time::timeout(SCRAPE_WAIT, sb.info()).await {
                processes
                    .get_or_create(&label)
                    .set(i64::try_from(info.process_count).unwrap_or(i64::MAX));
                memory
                    .get_or_create(&label)
                    .set(i64::try_from(info.memory_bytes).unwrap_or(i64::MAX));
                mailbox_full
                    .get_or_create(&label)
                    .inc_by(info.mailbox_full_total);
            }
            if let Ok(Ok(mods)) = tokio::time::timeout(SCRAPE_WAIT, sb.modules()).await {
                for m in mods {
                    modules
                        .get_or_create(&ModuleLabels {
                            sandbox: id.clone(),
                            module: m.name,
                            version: m.version.to_string(),
                        })
                        .set(1);
                }
            }
        }
        reg.register("graft_sandboxes", "Sandboxes on the node", sandboxes);
        reg.register("graft_processes", "Live processes", processes);
        reg.register(
            "graft_sandbox_memory_bytes",
            "Bytes of the sandbox's Luau heap",
            memory,
        );
        reg.register(
            "graft_mailbox_full",
            "Messages refused because the target's mailbox was full",
            mailbox_full,
        );
        reg.register(
            "graft_module_info",
            "The current version of each module (always 1)",
            modules,
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}

/// Seconds a committed reload took, from its report's timings.
fn reload_seconds(report: &serde_json::Value) -> Option<f64> {
    let t = &report["timings"];
    let us = t["compile_us"].as_u64()? + t["swap_us"].as_u64()?;
    Some(us as f64 / 1e6)
}

/// The tower layer's function: counts every request by route template.
pub(crate) async fn track(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let res = next.run(req).await;
    metrics.request(&route, res.status().as_u16());
    res
}

/// `GET /metrics`.
pub(crate) async fn metrics(
    State(node): State<Node>,
    axum::Extension(live): axum::Extension<super::Live>,
) -> Response {
    live.ensure_tasks();
    let body = live.metrics().render(&node).await;
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}
