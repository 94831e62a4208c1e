//! The lab: a fresh sandbox per purpose, built as production builds it with
//! the old version of the module, where states are migrated up and back
//! down; and the shrinking of a failing state.
//!
//! Invariants:
//! * Every sandbox a lab creates is destroyed before its method returns.
//! * Shrinking runs at most [`MAX_SHRINK_RUNS`] migrations and keeps the
//!   kind of the first failure.

use anyhow::{anyhow, Result};
use graft::{Node, ReloadOptions, SandboxSpec};
use serde_json::Value;

use super::states::*;
use super::*;

/// Runs the module's sandbox for one purpose and destroys it.
pub(super) struct Lab<'a> {
    pub(super) node: &'a Node,
    pub(super) spec: &'a SandboxSpec,
    pub(super) module: &'a str,
    pub(super) next: std::cell::Cell<usize>,
}

impl Lab<'_> {
    pub(super) fn sandbox(&self, old: &str, app: bool) -> Result<graft::Sandbox> {
        let n = self.next.get();
        self.next.set(n + 1);
        let mut s = self.spec.clone().test_clock(true);
        s.id = format!("mig{n}-{}", self.spec.id);
        s.id.truncate(64);
        if !app {
            s.entry = None;
        }
        s.modules.insert(self.module.to_string(), old.to_string());
        graft::block_on(self.node.create_sandbox(s))
            .map_err(|e| anyhow!("the previous version does not load: {e}"))
    }

    /// States of the module's processes the app starts under `old`.
    pub(super) fn app_states(&self, old: &str) -> Result<Vec<(String, Value)>> {
        let sb = self.sandbox(old, true)?;
        let out = (|| {
            if self.spec.entry.is_some() {
                wait("the app start", sb.wait_app_started())?;
            }
            let mut out = Vec::new();
            for p in wait("the process list", sb.processes())? {
                if p.module == self.module {
                    out.push((p.pid.to_string(), wait("a state", sb.state(&p.pid))?));
                }
            }
            Ok(out)
        })();
        let _ = self.node.destroy(sb.id());
        out
    }

    /// The state `init(entry_args)` builds under `old`.
    pub(super) fn init_state(&self, old: &str) -> Result<Value> {
        let sb = self.sandbox(old, false)?;
        let out = (|| {
            let pid = wait(
                "init",
                sb.spawn(self.module, self.spec.entry_args.clone(), None),
            )?;
            wait("the state", sb.state(&pid))
        })();
        let _ = self.node.destroy(sb.id());
        out
    }

    /// Migrates `state` up from `old` to the working tree and back down.
    /// `Ok(None)`: it round-trips. The state compared is the one the
    /// process holds (after the JSON → Luau conversion), not the input.
    pub(super) fn round_trip(&self, old: &str, state: &Value) -> Result<Option<Failure>> {
        let sb = self.sandbox(&wrap_init(old), false)?;
        let out = self.round_trip_in(&sb, state);
        let _ = self.node.destroy(sb.id());
        out
    }

    pub(super) fn round_trip_in(
        &self,
        sb: &graft::Sandbox,
        state: &Value,
    ) -> Result<Option<Failure>> {
        let fail =
            |kind: Kind, detail: String, before: &Value, up: &Value| -> Result<Option<Failure>> {
                Ok(Some(Failure {
                    kind,
                    detail,
                    before: before.clone(),
                    up: up.clone(),
                    down: Value::Null,
                }))
            };
        let mut arg = Map::new();
        arg.insert(STATE_KEY.into(), state.clone());
        let pid = match wait("spawning", sb.spawn(self.module, Value::Object(arg), None)) {
            Ok(p) => p,
            Err(e) => return fail(Kind::Load, e.to_string(), state, &Value::Null),
        };
        let before = wait("a state", sb.state(&pid))?;
        let current = self
            .spec
            .modules
            .get(self.module)
            .cloned()
            .unwrap_or_default();
        let sources = std::iter::once((self.module.to_string(), current)).collect();
        if let Err(e) = wait(
            "the up migration",
            sb.reload(sources, ReloadOptions::default()),
        ) {
            return fail(Kind::Up, e.to_string(), &before, &Value::Null);
        }
        let up = wait("a migrated state", sb.state(&pid))?;
        if let Err(e) = wait(
            "the rollback",
            sb.rollback(self.module, 1, ReloadOptions::default()),
        ) {
            return fail(Kind::Down, e.to_string(), &before, &up);
        }
        let down = wait("a state after the rollback", sb.state(&pid))?;
        if down == before {
            return Ok(None);
        }
        let (kind, detail) = if json_type(&down) != json_type(&before) {
            (
                Kind::TypeChanged,
                format!(
                    "changed type ({} → {})",
                    json_type(&before),
                    json_type(&down)
                ),
            )
        } else {
            (Kind::RoundTrip, "does not round-trip".to_string())
        };
        Ok(Some(Failure {
            kind,
            detail,
            before,
            up,
            down,
        }))
    }
}

/// Greedy shrinking: the smallest state found that fails the same way.
pub(super) fn shrink(lab: &Lab<'_>, old: &str, first: Failure) -> Result<(Failure, usize)> {
    let mut best = first;
    let mut runs = 0;
    'outer: loop {
        let mut candidates = smaller(&best.before);
        candidates.sort_by_key(size);
        for c in candidates {
            if runs >= MAX_SHRINK_RUNS {
                break 'outer;
            }
            if size(&c) >= size(&best.before) {
                continue;
            }
            runs += 1;
            if let Some(f) = lab.round_trip(old, &c)? {
                if f.kind == best.kind && size(&f.before) < size(&best.before) {
                    best = f;
                    continue 'outer;
                }
            }
        }
        break;
    }
    Ok((best, runs))
}
