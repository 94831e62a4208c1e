//! `graft token create|list|revoke`: the node's API tokens (admin).
//!
//! A new token's secret is printed alone on stdout (a script captures it)
//! and everything else on stderr: the node keeps only its SHA-256, so this
//! is the one time it can be read. A list never shows secrets.

use anyhow::Result;
use hyper::Method;
use serde_json::{json, Value};

use super::{seg, Client, DEFAULT_WAIT};
use crate::render;

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
}
