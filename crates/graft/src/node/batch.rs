//! Work across many sandboxes: a reload of the same sources into many
//! ([`BatchOptions`], [`Node::reload_batch`]) and stopping every app.
//!
//! Invariants:
//! * Results come in input order, one per id, whatever finished first.
//! * A rolling batch runs one sandbox at a time and stops at the first
//!   failure; the sandboxes not tried report `skipped`, never nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{with_timeout, Node};
use crate::error::{Error, ReloadStep, Result};
use crate::upgrade::{Direction, ReloadOptions, ReloadReport};

/// How [`Node::reload_batch`] runs: the options of each sandbox's reload,
/// how many sandboxes reload at once, and whether the batch is rolling.
///
/// ```
/// use graft::{BatchOptions, ReloadOptions};
/// let batch = BatchOptions::new(ReloadOptions::default()).max_concurrency(4);
/// assert_eq!(batch.max_concurrency, 4);
/// assert!(!batch.rolling);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BatchOptions {
    /// Applied to every sandbox's reload.
    pub reload: ReloadOptions,
    /// Sandboxes reloading at once (0 counts as 1). Default 8.
    pub max_concurrency: usize,
    /// One sandbox at a time; the first failure stops the batch and the
    /// rest report `skipped`. Default false.
    pub rolling: bool,
}

impl BatchOptions {
    /// A parallel batch (8 at once) with these reload options.
    pub fn new(reload: ReloadOptions) -> BatchOptions {
        BatchOptions {
            reload,
            max_concurrency: 8,
            rolling: false,
        }
    }
    /// Sets how many sandboxes reload at once.
    pub fn max_concurrency(mut self, n: usize) -> BatchOptions {
        self.max_concurrency = n;
        self
    }
    /// Makes the batch rolling (or not).
    pub fn rolling(mut self, rolling: bool) -> BatchOptions {
        self.rolling = rolling;
        self
    }
}

impl Default for BatchOptions {
    fn default() -> BatchOptions {
        BatchOptions::new(ReloadOptions::default())
    }
}

impl Node {
    /// Reloads the same sources into many sandboxes (SPEC §3 batch). Results
    /// come in input order. With [`BatchOptions::rolling`], the first failure
    /// stops the batch and the remaining sandboxes report `skipped`.
    ///
    /// ```
    /// use graft::{BatchOptions, Node, SandboxSpec};
    /// let node = Node::new();
    /// for id in ["a", "b"] {
    ///     graft::block_on(node.create_sandbox(SandboxSpec::new(id).entry(None).module("m", "return { v = 1 }"))).unwrap();
    /// }
    /// let ids = vec!["a".to_string(), "b".to_string()];
    /// let sources = [("m".to_string(), "return { v = 2 }".to_string())].into();
    /// let results = graft::block_on(node.reload_batch(&ids, &sources, &BatchOptions::default().rolling(true)));
    /// assert!(results.iter().all(|(_, r)| r.is_ok()));
    /// ```
    pub async fn reload_batch(
        &self,
        ids: &[String],
        sources: &BTreeMap<String, String>,
        batch: &BatchOptions,
    ) -> Vec<(String, Result<ReloadReport>)> {
        let opts = &batch.reload;
        let rolling = batch.rolling;
        let max_concurrency = if rolling {
            1
        } else {
            batch.max_concurrency.max(1)
        };
        let mut results: Vec<Option<Result<ReloadReport>>> = (0..ids.len()).map(|_| None).collect();
        let mut next = 0;
        let mut stop = false;
        while next < ids.len() && !stop {
            let end = (next + max_concurrency).min(ids.len());
            let mut waits = Vec::new();
            for (i, id) in ids.iter().enumerate().take(end).skip(next) {
                match self.sandbox(id) {
                    Ok(sb) => waits.push((
                        i,
                        Some(sb.reload_start(sources.clone(), opts.clone(), Direction::Up, None)),
                    )),
                    Err(e) => {
                        results[i] = Some(Err(e));
                        waits.push((i, None));
                    }
                }
            }
            for (i, w) in waits {
                if let Some(w) = w {
                    results[i] = Some(match w {
                        Ok(rx) => rx
                            .await
                            .unwrap_or_else(|_| Err(Error::SandboxStopped(ids[i].clone()))),
                        Err(e) => Err(e),
                    });
                }
                if rolling && results[i].as_ref().is_some_and(|r| r.is_err()) {
                    stop = true;
                }
            }
            next = end;
        }
        ids.iter()
            .zip(results)
            .map(|(id, r)| {
                (
                    id.clone(),
                    r.unwrap_or_else(|| {
                        Err(Error::ReloadAborted {
                            step: ReloadStep::Rolling,
                            module: None,
                            process: None,
                            line: None,
                            column: None,
                            message: "skipped: an earlier sandbox in the rolling batch failed"
                                .into(),
                        })
                    }),
                )
            })
            .collect()
    }

    /// Stops every sandbox's app in order (terminate callbacks run), waiting
    /// up to `timeout` per sandbox.
    pub async fn stop_all(&self, timeout: Duration) {
        let ids = self.sandbox_ids();
        for id in ids {
            if let Ok(sb) = self.sandbox(&id) {
                let _ = with_timeout(sb.stop_app(), timeout).await;
            }
        }
    }
}
