//! `graft events`: the node's recent events, and with `--follow` its event
//! stream (server-sent events).
//!
//! The stream is resumed by `Last-Event-ID` after a dropped connection, so
//! that no event is printed twice and none is skipped; the node reports
//! those it dropped as a `gap`, printed as a warning on stderr (stdout stays
//! one line per event for pipes).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use serde_json::{json, Value};

use super::{deepest_cause, seg, Client, DEFAULT_WAIT};
use crate::render;

/// A refusal of the stream that asking again cannot change (401, 403, 400).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Client {
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
                // Asking again cannot help (a revoked token, a malformed
                // query): say why and stop.
                Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
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
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            // Too many streams (429) or a node busy restarting (5xx) may
            // pass; a refusal of this caller or this query will not.
            if status.is_client_error() && status.as_u16() != 429 && status.as_u16() != 408 {
                return Err(
                    Refused(format!("the node refused the stream ({status}): {text}")).into(),
                );
            }
            bail!("the node refused the stream: {text}");
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
        if gap["reset"] == json!(true) {
            eprintln!(
                "warning: the node has no event {} (its log restarted: a node without a data dir was restarted); showing its events from the start",
                gap["after"].as_u64().unwrap_or(0)
            );
            return;
        }
        eprintln!(
            "warning: events {}..={} were dropped before they could be shown",
            gap["after"].as_u64().unwrap_or(0) + 1,
            gap["up_to"].as_u64().unwrap_or(0)
        );
    }
}
