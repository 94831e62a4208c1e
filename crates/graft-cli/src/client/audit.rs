//! `graft audit`: one page of the node's audit log, newest first (admin).
//!
//! Filters travel as query parameters, each value percent-encoded; the next
//! page is named by the last row's id (`--before`), printed after the table,
//! so that paging is stable while new rows arrive.

use anyhow::Result;
use hyper::Method;
use serde_json::Value;

use super::{seg, Client, DEFAULT_WAIT};
use crate::render;

/// Filters of `graft audit`.
pub struct AuditFilters {
    pub token: Option<String>,
    pub sandbox: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<u64>,
    pub before: Option<u64>,
    pub limit: u64,
}

impl Client {
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
