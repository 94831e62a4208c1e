//! The verbs on a sandbox's processes and code: `call`, `cast`, `ps`,
//! `state` and `eval`.
//!
//! `call` and `eval` wait for the node's own time limit (`--timeout-ms`, else
//! the API's default) plus a margin, so that the node's answer (a timeout
//! error with its details) arrives before the client gives up on it.

use std::time::Duration;

use anyhow::Result;
use hyper::Method;
use serde_json::{json, Value};

use super::{seg, Client, DEFAULT_WAIT};
use crate::render;

impl Client {
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
}
