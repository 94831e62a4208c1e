//! Canary windows: opening one after a reload, ending it when another
//! reload replaces what it watched, and rolling a tripped one back.
//!
//! # Invariants
//! * One window per sandbox: a reload that opens a window ends the one
//!   open before.
//! * A window ended by a reload agrees with what its commit made permanent
//!   (`upgrade::ends_window`), so memory and disk agree.
//! * A tripped window whose rollback finds processes busy stays tripped and
//!   is tried again after the next slice.

use std::collections::{BTreeMap, HashMap};

use super::reload::prepared_from_versions;
use super::Runtime;
use crate::kernel::{CanaryWatch, Timer};
use crate::upgrade::{Applied, Direction, ReloadOptions, ReloadReport};

impl Runtime {
    /// A reload or rollback of a module under a canary window ends that
    /// window: the version it watched is no longer the one running, so it
    /// can neither pass nor trip. So does a reload that opens a window of
    /// its own (one window per sandbox). The commit that ended it already
    /// made the watched versions that stay running permanent, by the same
    /// rule (`upgrade::ends_window`), so memory and disk agree.
    pub(super) fn end_canary_touched_by(
        &mut self,
        report: &ReloadReport,
        opts: &ReloadOptions,
        direction: Direction,
    ) {
        let mut k = self.kernel.borrow();
        let ends = k
            .canary
            .as_ref()
            .is_some_and(|c| crate::upgrade::ends_window(c, report, opts));
        if !ends {
            return;
        }
        if let Some(c) = k.canary.take() {
            k.cancel_timer(c.timer);
            let modules: Vec<&String> = c.modules.iter().map(|m| &m.3).collect();
            let touched = c
                .modules
                .iter()
                .any(|(_, _, _, name)| report.modules.iter().any(|m| m.name == *name));
            let why = match (touched, direction) {
                (true, Direction::Up) => "a reload replaced a version under watch",
                (true, Direction::Down) => "a rollback replaced a version under watch",
                (false, _) => "a new canary window replaced it",
            };
            // What the commit made permanent: the watched versions that were
            // running, except those it rolled back.
            let kept: Vec<serde_json::Value> = c
                .modules
                .iter()
                .filter(|(_, to, _, name)| {
                    if report.modules.iter().any(|m| m.name == *name) {
                        matches!(direction, Direction::Up)
                    } else {
                        self.engine
                            .modules
                            .get(name)
                            .is_some_and(|h| h.current == *to)
                    }
                })
                .map(|(_, to, _, name)| serde_json::json!({ "module": name, "version": to }))
                .collect();
            k.event(
                "canary_ended",
                serde_json::json!({ "modules": modules, "why": why, "permanent": kept }),
            );
        }
    }

    pub(super) fn arm_canary(&mut self, report: &ReloadReport, opts: &ReloadOptions) {
        let mut k = self.kernel.borrow();
        let modules: Vec<(u32, u32, u32, String)> = report
            .modules
            .iter()
            .filter(|c| c.from > 0)
            .filter_map(|c| {
                k.module_id(&c.name)
                    .map(|m| (m, c.to, c.from, c.name.clone()))
            })
            .collect();
        if modules.is_empty() {
            return;
        }
        if let Some(old) = k.canary.take() {
            k.cancel_timer(old.timer);
        }
        let now = k.timer_now();
        let timer = k.add_timer(now + opts.canary_ms, Timer::Canary);
        k.canary = Some(CanaryWatch {
            modules,
            crashes_allowed: opts.canary_crashes.max(1),
            crashes: 0,
            last_reason: None,
            timer,
        });
    }

    /// Rolls a tripped canary back. Called after every time slice.
    pub fn check_canary(&mut self) {
        let tripped = {
            let mut k = self.kernel.borrow();
            match k.canary.as_ref() {
                Some(c) if c.tripped() => {
                    let c = k.canary.take().expect("checked");
                    k.cancel_timer(c.timer);
                    Some(c)
                }
                _ => None,
            }
        };
        let Some(c) = tripped else { return };
        let mut sources = BTreeMap::new();
        let mut targets = HashMap::new();
        for (_, _, back_to, name) in &c.modules {
            if let Some(v) = self.engine.modules.get(name).and_then(|h| h.get(*back_to)) {
                sources.insert(name.clone(), v.clone());
                targets.insert(name.clone(), *back_to);
            }
        }
        let prepared = prepared_from_versions(&sources, &self.engine);
        let reason = c.last_reason.clone().unwrap_or_default();
        let result = self.engine.apply(
            &self.vm,
            prepared,
            &ReloadOptions::default(),
            Direction::Down,
            Some(&targets),
        );
        let mut k = self.kernel.borrow();
        match result {
            Ok(Applied::Done(report)) => {
                k.event(
                    "canary_rollback",
                    serde_json::json!({
                        "why": format!("{} crash(es) of upgraded processes within the canary window; last: {reason}", c.crashes),
                        "crashes": c.crashes,
                        "report": report,
                    }),
                );
                tracing::warn!(sandbox = %k.id, crashes = c.crashes, "canary tripped: rolled back");
            }
            Ok(Applied::Busy(_)) => {
                // Try again after the next slice: keep the tripped watch.
                k.canary = Some(c);
            }
            Err(e) => k.event(
                "canary_rollback_failed",
                serde_json::json!({ "error": e.to_string() }),
            ),
        }
    }
}
