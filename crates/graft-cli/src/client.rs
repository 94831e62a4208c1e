//! The client verbs: small HTTP/1.1 requests to a node's API (hyper-util's
//! client; hyper is in the tree through axum already), over https through
//! hyper-rustls when the URL says so. Every request carries the token that
//! `datadir::resolve_token` finds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::datadir::{resolve_token, token_places, TokenSource};
use crate::{render, Conn, Reported};

/// How long a request may take when nothing says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

pub struct Client {
    base: String,
    json: bool,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Option<(String, TokenSource)>,
}

/// Filters of `graft audit`.
pub struct AuditFilters {
    pub token: Option<String>,
    pub sandbox: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<u64>,
    pub before: Option<u64>,
    pub limit: u64,
}

/// The TLS settings of an https client: the CA of `--cacert` only, else the
/// system's roots.
fn tls_config(cacert: Option<&Path>) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow!("cannot read --cacert {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    anyhow!("--cacert {}: not a PEM certificate: {e}", path.display())
                })?;
                roots.add(cert).map_err(|e| {
                    anyhow!("--cacert {}: unusable certificate: {e}", path.display())
                })?;
            }
            if roots.is_empty() {
                bail!(
                    "--cacert {}: no certificate found (expected -----BEGIN CERTIFICATE-----)",
                    path.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Options of `graft reload`.
pub struct ReloadArgs {
    pub dry_run: bool,
    pub extra: Option<Value>,
    pub state_handler: Option<PathBuf>,
    pub canary_ms: Option<u64>,
    pub canary_crashes: Option<u32>,
}

/// An error answer of the API: its status and `error` object.
struct ApiFailure {
    error: Value,
}

impl Client {
    pub fn new(conn: &Conn) -> Result<Client> {
        let url = conn.url.trim_end_matches('/');
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| anyhow!("invalid --url `{url}`: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                bail!("invalid --url `{url}`: use http:// or https://, not {other}://")
            }
            None => bail!("invalid --url `{url}`: expected http://HOST:PORT or https://HOST:PORT"),
        };
        if uri.host().is_none() {
            bail!("invalid --url `{url}`: expected http://HOST:PORT or https://HOST:PORT");
        }
        if conn.cacert.is_some() && !https {
            bail!("--cacert is for https:// URLs; `{url}` is plain http");
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        // The system's roots are read only when they may be needed.
        let tls = if https {
            tls_config(conn.cacert.as_deref())?
        } else {
            tls_config_empty()?
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = HyperClient::builder(TokioExecutor::new()).build(connector);
        let cwd = std::env::current_dir().unwrap_or_default();
        Ok(Client {
            base: url.to_owned(),
            json: conn.json,
            http,
            token: resolve_token(conn.token.as_deref(), &cwd),
        })
    }

    /// Sends a request; `Ok(Err(..))` is an error answer of the API.
    /// Adds the token this client found (if any) as `Authorization: Bearer`.
    fn authorize(
        &self,
        req: hyper::http::request::Builder,
    ) -> Result<hyper::http::request::Builder> {
        let Some((token, _)) = &self.token else {
            return Ok(req);
        };
        let value = hyper::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            anyhow!("the token holds characters a header cannot carry; check --token or GRAFT_TOKEN")
        })?;
        Ok(req.header("authorization", value))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
    ) -> Result<std::result::Result<Value, ApiFailure>> {
        let uri = format!("{}/api/v1{path}", self.base);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .header("accept", "application/json");
        req = self.authorize(req)?;
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| anyhow!("invalid request to {uri}: {e}"))?;
        let unreachable = |detail: String| {
            anyhow!(
                "cannot reach the Graft node at {}: {detail}; is `graft run` or `graft serve` running?",
                self.base
            )
        };
        let resp = match tokio::time::timeout(wait, self.http.request(req)).await {
            Err(_) => bail!(
                "the Graft node at {} did not answer within {} s",
                self.base,
                wait.as_secs()
            ),
            Ok(Err(e)) => return Err(unreachable(deepest_cause(&e))),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        let bytes = match tokio::time::timeout(wait, resp.into_body().collect()).await {
            Err(_) => bail!(
                "the Graft node at {} did not finish its answer within {} s",
                self.base,
                wait.as_secs()
            ),
            Ok(Err(e)) => return Err(unreachable(deepest_cause(&e))),
            Ok(Ok(b)) => b.to_bytes(),
        };
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| {
                anyhow!(
                    "unexpected answer from {uri} (status {status}): {}; is this a Graft node?",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                )
            })?
        };
        if status.is_success() {
            Ok(Ok(value))
        } else if value["error"].is_object() {
            Ok(Err(ApiFailure {
                error: value["error"].clone(),
            }))
        } else {
            bail!("unexpected answer from {uri} (status {status}): {value}")
        }
    }

    /// A request whose error answer is printed and ends the command with exit 1.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
    ) -> Result<Value> {
        self.send_with_files(method, path, body, wait, &|_| None)
            .await
    }

    async fn send_with_files(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        wait: Duration,
        file_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Value> {
        match self.request(method, path, body, wait).await? {
            Ok(v) => Ok(v),
            Err(failure) => {
                if self.json {
                    println!(
                        "{}",
                        render::json(&json!({ "error": failure.error }), false)
                    );
                } else {
                    eprint!("{}", render::error(&failure.error, file_of));
                    if failure.error["kind"] == "unauthorized" {
                        eprintln!("{}", self.token_hint());
                    }
                }
                Err(Reported.into())
            }
        }
    }

    /// Where the token came from (or was looked for), after a 401.
    fn token_hint(&self) -> String {
        match &self.token {
            Some((_, TokenSource::Given)) => {
                "  = note: the token came from --token or GRAFT_TOKEN".into()
            }
            Some((_, TokenSource::File(f))) => format!(
                "  = note: the token came from {}; is this the node that wrote it?",
                f.display()
            ),
            None => {
                let cwd = std::env::current_dir().unwrap_or_default();
                let places: Vec<String> = token_places(&cwd)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                format!(
                    "  = note: no token found: pass --token or set GRAFT_TOKEN (looked in {})",
                    if places.is_empty() {
                        "no token file".into()
                    } else {
                        places.join(", ")
                    }
                )
            }
        }
    }

    /// `v` as JSON: compact with `--json`, else pretty.
    fn print_json(&self, v: &Value) {
        println!("{}", render::json(v, !self.json));
    }

    /// With `--json`, prints `v` and is true; else the caller prints its view.
    fn printed_json(&self, v: &Value) -> bool {
        if self.json {
            println!("{}", render::json(v, false));
        }
        self.json
    }

    pub async fn call(
        &self,
        sandbox: &str,
        target: &str,
        request: Value,
        timeout_ms: Option<u64>,
    ) -> Result<()> {
        let wait = Duration::from_millis(timeout_ms.unwrap_or(graft_http::DEFAULT_TIMEOUT_MS))
            + Duration::from_secs(10);
        let mut body = json!({ "to": target, "request": request });
        if let Some(ms) = timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        let v = self
            .send(
                Method::POST,
                &format!("/sandboxes/{}/call", seg(sandbox)),
                Some(body),
                wait,
            )
            .await?;
        if !self.printed_json(&v) {
            println!("{}", render::pretty(&v["reply"]));
        }
        Ok(())
    }

    pub async fn cast(&self, sandbox: &str, target: &str, message: Value) -> Result<()> {
        let body = json!({ "to": target, "message": message });
        let v = self
            .send(
                Method::POST,
                &format!("/sandboxes/{}/cast", seg(sandbox)),
                Some(body),
                DEFAULT_WAIT,
            )
            .await?;
        if !self.printed_json(&v) {
            let target = render::escape(target, render::Lines::Escape);
            println!("✓ cast to {target} queued");
        }
        Ok(())
    }

    pub async fn ps(&self, sandbox: &str) -> Result<()> {
        let v = self
            .send(
                Method::GET,
                &format!("/sandboxes/{}/processes", seg(sandbox)),
                None,
                DEFAULT_WAIT,
            )
            .await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        vec![
                            p["pid"].as_str().unwrap_or("").to_owned(),
                            p["name"].as_str().unwrap_or("-").to_owned(),
                            p["module"].as_str().unwrap_or("").to_owned(),
                            format!("v{}", p["version"].as_u64().unwrap_or(0)),
                            p["status"].as_str().unwrap_or("").to_owned(),
                            p["mailbox_len"].as_u64().unwrap_or(0).to_string(),
                            render::bytes(p["memory_bytes"].as_u64().unwrap_or(0)),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            render::table(
                &["PID", "NAME", "MODULE", "VERSION", "STATUS", "MAILBOX", "MEMORY"],
                &rows
            )
        );
        let n = rows.len();
        println!("{n} process{}", if n == 1 { "" } else { "es" });
        Ok(())
    }

    pub async fn state(&self, sandbox: &str, target: &str) -> Result<()> {
        let path = format!(
            "/sandboxes/{}/processes/{}/state",
            seg(sandbox),
            seg(target)
        );
        let v = self.send(Method::GET, &path, None, DEFAULT_WAIT).await?;
        self.print_json(&v);
        Ok(())
    }

    pub async fn eval(&self, sandbox: &str, source: &str, timeout_ms: Option<u64>) -> Result<()> {
        let wait = Duration::from_millis(timeout_ms.unwrap_or(graft_http::DEFAULT_TIMEOUT_MS))
            + Duration::from_secs(10);
        let mut body = json!({ "source": source });
        if let Some(ms) = timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        let v = self
            .send(
                Method::POST,
                &format!("/sandboxes/{}/eval", seg(sandbox)),
                Some(body),
                wait,
            )
            .await?;
        if !self.printed_json(&v) {
            println!("{}", render::pretty(&v["result"]));
        }
        Ok(())
    }

    pub async fn reload(&self, sandbox: &str, files: &[PathBuf], args: ReloadArgs) -> Result<()> {
        let mut modules = BTreeMap::new();
        let mut file_names = BTreeMap::new();
        for file in files {
            let name = module_name_of(file)?;
            let source = std::fs::read_to_string(file)
                .map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
            if modules
                .insert(name.clone(), Value::String(source))
                .is_some()
            {
                bail!("two files give module `{name}`; name each module once");
            }
            file_names.insert(name, file.display().to_string());
        }
        let mut body = json!({ "modules": modules, "dry_run": args.dry_run });
        if let Some(extra) = args.extra {
            body["extra"] = extra;
        }
        if let Some(path) = &args.state_handler {
            let src = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
            body["state_handler"] = json!(src);
        }
        if let Some(ms) = args.canary_ms {
            body["canary_ms"] = json!(ms);
        }
        if let Some(n) = args.canary_crashes {
            body["canary_crashes"] = json!(n);
        }
        let file_of = |m: &str| file_names.get(m).cloned();
        let wait = DEFAULT_WAIT;
        let v = self
            .send_with_files(
                Method::POST,
                &format!("/sandboxes/{}/reload", seg(sandbox)),
                Some(body),
                wait,
                &file_of,
            )
            .await?;
        self.print_report(
            &v,
            &format!(
                "unchanged: {} already current",
                modules.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        );
        Ok(())
    }

    fn print_report(&self, v: &Value, unchanged: &str) {
        if !self.printed_json(v) {
            let unchanged = render::escape(unchanged, render::Lines::Escape);
            println!(
                "{}",
                render::report_line(v).unwrap_or_else(|| format!("= {unchanged}"))
            );
        }
    }

    pub async fn versions(&self, sandbox: &str, module: &str) -> Result<()> {
        let path = format!(
            "/sandboxes/{}/modules/{}/versions",
            seg(sandbox),
            seg(module)
        );
        let v = self.send(Method::GET, &path, None, DEFAULT_WAIT).await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        let deps: Vec<&str> = v["dependencies"]
                            .as_array()
                            .map(|d| d.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        vec![
                            format!("v{}", v["version"].as_u64().unwrap_or(0)),
                            if v["current"] == json!(true) {
                                "*".into()
                            } else {
                                String::new()
                            },
                            v["checksum"]
                                .as_str()
                                .unwrap_or("")
                                .chars()
                                .take(12)
                                .collect(),
                            render::timestamp(v["loaded_at_ms"].as_f64().unwrap_or(0.0)),
                            if deps.is_empty() {
                                "-".into()
                            } else {
                                deps.join(", ")
                            },
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            render::table(
                &["VERSION", "CURRENT", "CHECKSUM", "LOADED (UTC)", "REQUIRES"],
                &rows
            )
        );
        Ok(())
    }

    /// `graft events`: the node's recent events (`GET /events`), then with
    /// `follow` every new one as it happens (`GET /events/stream`, resuming
    /// by `Last-Event-ID` after a dropped connection) until Ctrl-C.
    pub async fn events(
        &self,
        sandbox: Option<&str>,
        kinds: &[String],
        follow: bool,
    ) -> Result<()> {
        let mut query = String::new();
        if let Some(sb) = sandbox {
            query.push_str(&format!("&sandbox={}", seg(sb)));
        }
        if !kinds.is_empty() {
            let joined: Vec<String> = kinds.iter().map(|k| seg(k)).collect();
            query.push_str(&format!("&kind={}", joined.join(",")));
        }
        let page = self
            .send(
                Method::GET,
                &format!("/events?tail=100{query}"),
                None,
                DEFAULT_WAIT,
            )
            .await?;
        if let Some(gap) = page["gap"].as_object() {
            self.print_gap(&Value::Object(gap.clone()));
        }
        for e in page["events"].as_array().into_iter().flatten() {
            self.print_event(e);
        }
        if !follow {
            return Ok(());
        }
        let mut last = page["last_seq"].as_u64().unwrap_or(0);
        loop {
            match self.follow_once(&query, &mut last).await {
                Ok(()) => {}
                Err(e) => eprintln!("graft: event stream interrupted ({e}); reconnecting …"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Reads the stream from `last` until it ends; `last` follows each frame.
    async fn follow_once(&self, query: &str, last: &mut u64) -> Result<()> {
        let uri = format!(
            "{}/api/v1/events/stream?{}",
            self.base,
            query.trim_start_matches('&')
        );
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(&uri)
            .header("accept", "text/event-stream")
            .header("last-event-id", last.to_string());
        req = self.authorize(req)?;
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| anyhow!("invalid request to {uri}: {e}"))?;
        let resp = self.http.request(req).await.map_err(|e| {
            anyhow!(
                "cannot reach the Graft node at {}: {}",
                self.base,
                deepest_cause(&e)
            )
        })?;
        if !resp.status().is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!(
                "the node refused the stream: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| anyhow!("{}", deepest_cause(&e)))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            // A frame ends at a blank line; a partial one waits for more.
            while let Some(end) = buf.find("\n\n") {
                let text: String = buf.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, "message", String::new());
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.trim().parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        kind = if v.trim() == "gap" { "gap" } else { "message" };
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if let Some(id) = id {
                    *last = id;
                }
                let Ok(v) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                if kind == "gap" {
                    self.print_gap(&v);
                } else {
                    self.print_event(&v);
                }
            }
        }
        Ok(())
    }

    fn print_event(&self, e: &Value) {
        if self.json {
            println!("{}", render::json(e, false));
            return;
        }
        let detail = render::json(&e["detail"], false);
        let detail: String = detail.chars().take(200).collect();
        println!(
            "{:>6}  {}  {:<12}  {:<18}  {}",
            e["seq"].as_u64().unwrap_or(0),
            render::timestamp(e["at_ms"].as_f64().unwrap_or(0.0)),
            render::escape(e["sandbox"].as_str().unwrap_or(""), render::Lines::Escape),
            render::escape(e["kind"].as_str().unwrap_or(""), render::Lines::Escape),
            render::escape(&detail, render::Lines::Escape),
        );
    }

    fn print_gap(&self, gap: &Value) {
        if self.json {
            println!("{}", render::json(&json!({ "gap": gap }), false));
            return;
        }
        eprintln!(
            "warning: events {}..={} were dropped before they could be shown",
            gap["after"].as_u64().unwrap_or(0) + 1,
            gap["up_to"].as_u64().unwrap_or(0)
        );
    }

    pub async fn rollback(&self, sandbox: &str, module: &str, version: u32) -> Result<()> {
        let path = format!(
            "/sandboxes/{}/modules/{}/rollback",
            seg(sandbox),
            seg(module)
        );
        let v = self
            .send(
                Method::POST,
                &path,
                Some(json!({ "version": version })),
                DEFAULT_WAIT,
            )
            .await?;
        self.print_report(
            &v,
            &format!("unchanged: {module} v{version} is already current"),
        );
        Ok(())
    }
}

impl Client {
    pub async fn token_create(
        &self,
        role: &str,
        sandboxes: Vec<String>,
        label: Option<String>,
    ) -> Result<()> {
        let mut body = json!({ "role": role });
        if !sandboxes.is_empty() {
            body["sandboxes"] = json!(sandboxes);
        }
        if let Some(l) = label {
            body["label"] = json!(l);
        }
        let v = self
            .send(Method::POST, "/tokens", Some(body), DEFAULT_WAIT)
            .await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        // The secret alone on stdout (scripts capture it); the rest on stderr.
        println!("{}", v["token"].as_str().unwrap_or(""));
        let scope = match v["sandboxes"].as_array() {
            Some(list) => list
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            None => "all sandboxes".into(),
        };
        eprintln!(
            "✓ token {} ({}, {}): shown once, only its SHA-256 is kept",
            render::escape(v["id"].as_str().unwrap_or(""), render::Lines::Escape),
            v["role"].as_str().unwrap_or(""),
            render::escape(&scope, render::Lines::Escape)
        );
        Ok(())
    }

    pub async fn token_list(&self) -> Result<()> {
        let v = self
            .send(Method::GET, "/tokens", None, DEFAULT_WAIT)
            .await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        let text = |x: &Value| {
            render::escape(x.as_str().unwrap_or("-"), render::Lines::Escape).into_owned()
        };
        let rows: Vec<Vec<String>> = v
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        vec![
                            text(&t["id"]),
                            text(&t["role"]),
                            match t["sandboxes"].as_array() {
                                Some(l) => render::escape(
                                    &l.iter()
                                        .filter_map(Value::as_str)
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    render::Lines::Escape,
                                )
                                .into_owned(),
                                None => "*".into(),
                            },
                            text(&t["label"]),
                            render::timestamp(t["created_ms"].as_f64().unwrap_or(0.0)),
                            t["revoked_ms"]
                                .as_f64()
                                .map_or_else(|| "-".into(), render::timestamp),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            render::table(
                &[
                    "ID",
                    "ROLE",
                    "SANDBOXES",
                    "LABEL",
                    "CREATED (UTC)",
                    "REVOKED (UTC)"
                ],
                &rows
            )
        );
        Ok(())
    }

    pub async fn token_revoke(&self, id: &str) -> Result<()> {
        let v = self
            .send(
                Method::DELETE,
                &format!("/tokens/{}", seg(id)),
                None,
                DEFAULT_WAIT,
            )
            .await?;
        if !self.printed_json(&v) {
            println!(
                "✓ token {} revoked",
                render::escape(id, render::Lines::Escape)
            );
        }
        Ok(())
    }

    pub async fn audit(&self, f: AuditFilters) -> Result<()> {
        let mut query = vec![format!("limit={}", f.limit)];
        for (k, v) in [
            ("token", &f.token),
            ("sandbox", &f.sandbox),
            ("outcome", &f.outcome),
        ] {
            if let Some(v) = v {
                query.push(format!("{k}={}", seg(v)));
            }
        }
        if let Some(ms) = f.since_ms {
            query.push(format!("since_ms={ms}"));
        }
        if let Some(b) = f.before {
            query.push(format!("before={b}"));
        }
        let v = self
            .send(
                Method::GET,
                &format!("/audit?{}", query.join("&")),
                None,
                DEFAULT_WAIT,
            )
            .await?;
        if self.printed_json(&v) {
            return Ok(());
        }
        let text = |x: &Value| {
            render::escape(x.as_str().unwrap_or("-"), render::Lines::Escape).into_owned()
        };
        let rows: Vec<Vec<String>> = v["rows"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        vec![
                            r["id"].as_u64().unwrap_or(0).to_string(),
                            render::timestamp(r["at_ms"].as_f64().unwrap_or(0.0)),
                            text(&r["token_id"]),
                            text(&r["role"]),
                            text(&r["method"]),
                            text(&r["route"]),
                            text(&r["sandbox"]),
                            text(&r["outcome"]),
                            r["status"]
                                .as_u64()
                                .map_or_else(|| "-".into(), |s| s.to_string()),
                            format!(
                                "{:.1} ms",
                                r["duration_us"].as_u64().unwrap_or(0) as f64 / 1000.0
                            ),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            render::table(
                &[
                    "ID",
                    "TIME (UTC)",
                    "TOKEN",
                    "ROLE",
                    "METHOD",
                    "ROUTE",
                    "SANDBOX",
                    "OUTCOME",
                    "STATUS",
                    "TOOK"
                ],
                &rows
            )
        );
        if let Some(next) = v["next_before"].as_u64() {
            println!("more: graft audit --before {next}");
        }
        Ok(())
    }
}

/// A TLS configuration for plain-http clients: never used for a handshake.
fn tls_config_empty() -> Result<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// The module name of a file: its path under the nearest `src/` directory
/// (`src/chat/room.luau` is `chat.room`), else its file name.
pub fn module_name_of(file: &Path) -> Result<String> {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    for dir in abs.ancestors().skip(1) {
        if dir.file_name().is_some_and(|n| n == "src") {
            if let Some(name) = graft::config::module_name_for(dir, &abs) {
                return Ok(name);
            }
        }
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    graft::config::validate_module_name(stem)
        .map_err(|e| anyhow!("cannot name a module after {}: {e}", file.display()))?;
    Ok(stem.to_owned())
}

/// Percent-encodes one path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The innermost cause's message (`Connection refused (os error 111)`).
fn deepest_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("<counter.3>"), "%3Ccounter.3%3E");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
        assert_eq!(seg("chat.room"), "chat.room");
    }

    #[test]
    fn module_names_from_paths() {
        assert_eq!(
            module_name_of(Path::new("/p/src/chat/room.luau")).unwrap(),
            "chat.room"
        );
        assert_eq!(
            module_name_of(Path::new("/p/src/counter.luau")).unwrap(),
            "counter"
        );
        assert_eq!(
            module_name_of(Path::new("/tmp/x/counter.luau")).unwrap(),
            "counter"
        );
        assert!(module_name_of(Path::new("/tmp/bad name.luau")).is_err());
    }
}
