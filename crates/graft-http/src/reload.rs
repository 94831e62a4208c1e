//! `/sandboxes/{id}/reload` and `/reload` (batch): new sources for running
//! modules, as one transaction per sandbox. `dry_run` compiles and checks
//! without changing anything; a canary (`canary_ms`, `canary_crashes`)
//! watches the upgraded processes and rolls back on crashes.
//!
//! Absent and `null` options both mean the default. A batch checks every
//! sandbox id and module name before touching any sandbox, names each
//! sandbox at most once (a sandbox reloaded twice at once would race with
//! itself), and answers 200 with one result per sandbox, in input order: a
//! failed sandbox's result is the error body it would have alone, with its
//! status.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Extension, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::{Node, ReloadOptions, StateHandler};
use serde::Deserialize;
use serde_json::{json, Number, Value};

use crate::body::Body;
use crate::bounds;
use crate::errors::{invalid, ApiError, ApiResult};
use crate::request::sandbox;
use crate::trust::audit::EffectAudit;

/// The reload options shared by every reload-like request; absent and
/// `null` both mean the default.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct OptionsBody {
    #[serde(default)]
    pub(crate) extra: Value,
    pub(crate) state_handler: Option<String>,
    pub(crate) dry_run: Option<bool>,
    pub(crate) canary_ms: Option<Number>,
    pub(crate) canary_crashes: Option<Number>,
}

impl OptionsBody {
    /// The options, each integer checked against its bound.
    pub(crate) fn into_options(self) -> ApiResult<ReloadOptions> {
        let canary_ms = bounds::canary_ms().check_or(self.canary_ms.as_ref(), 0)?;
        let crashes = bounds::canary_crashes().check_or(self.canary_crashes.as_ref(), 1)?;
        Ok(ReloadOptions {
            extra: self.extra,
            state_handler: self.state_handler.map(StateHandler::Luau),
            dry_run: self.dry_run.unwrap_or(false),
            canary_ms,
            // In range: MAX_CANARY_CRASHES fits a u32.
            canary_crashes: u32::try_from(crashes).unwrap_or(u32::MAX),
            attached: None,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReloadBody {
    modules: BTreeMap<String, String>,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
    canary_ms: Option<Number>,
    canary_crashes: Option<Number>,
}

impl ReloadBody {
    fn split(self) -> ApiResult<(BTreeMap<String, String>, ReloadOptions)> {
        let opts = OptionsBody {
            extra: self.extra,
            state_handler: self.state_handler,
            dry_run: self.dry_run,
            canary_ms: self.canary_ms,
            canary_crashes: self.canary_crashes,
        }
        .into_options()?;
        if self.modules.is_empty() {
            return Err(invalid(
                "modules is empty: name at least one module and its source",
            ));
        }
        Ok((self.modules, opts))
    }
}

pub(crate) async fn reload(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
    audit: Option<Extension<EffectAudit>>,
    Body(body): Body<ReloadBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    let (sources, mut opts) = body.split()?;
    // The audit row commits with the reload (SPEC §9).
    opts.attached = EffectAudit::of(audit.as_ref());
    Ok(Json(sb.reload(sources, opts).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchBody {
    sandboxes: Vec<String>,
    modules: BTreeMap<String, String>,
    max_concurrency: Option<Number>,
    rolling: Option<bool>,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
    canary_ms: Option<Number>,
    canary_crashes: Option<Number>,
}

/// Checks the sandboxes of a batch: at most `max_sandboxes`, each a valid id,
/// none twice (a sandbox reloaded twice at once would race with itself).
fn check_batch_ids(ids: &[String], node: &graft::NodeLimits) -> ApiResult<()> {
    bounds::batch_size(node).check_count(ids.len())?;
    let mut seen = BTreeSet::new();
    for id in ids {
        graft::config::validate_sandbox_id(id)?;
        if !seen.insert(id.as_str()) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "duplicate_sandbox",
                format!("sandbox `{id}` is named twice in the batch; name each sandbox once"),
            )
            .with("sandbox", id));
        }
    }
    Ok(())
}

pub(crate) async fn batch(
    State(node): State<Node>,
    Body(body): Body<BatchBody>,
) -> ApiResult<Json<Value>> {
    let default_concurrency = node.threads() as u64;
    let max_concurrency = bounds::max_concurrency(node.limits())
        .check_or(body.max_concurrency.as_ref(), default_concurrency)?;
    check_batch_ids(&body.sandboxes, node.limits())?;
    // Batch sources go to every sandbox: a bad name would fail each one alike.
    for name in body.modules.keys() {
        graft::config::validate_module_name(name)?;
    }
    let (ids, rolling) = (body.sandboxes, body.rolling.unwrap_or(false));
    let (sources, opts) = ReloadBody {
        modules: body.modules,
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        canary_ms: body.canary_ms,
        canary_crashes: body.canary_crashes,
    }
    .split()?;
    // In range: at most max_sandboxes, a usize.
    let max_concurrency = usize::try_from(max_concurrency).unwrap_or(usize::MAX);
    let results = node
        .reload_batch(
            &ids,
            &sources,
            &graft::BatchOptions::new(opts)
                .max_concurrency(max_concurrency)
                .rolling(rolling),
        )
        .await;
    let out = results
        .into_iter()
        .map(|(sandbox, result)| match result {
            Ok(report) => json!({ "sandbox": sandbox, "ok": true, "result": report }),
            Err(e) => {
                let err = ApiError::from(e);
                json!({ "sandbox": sandbox, "ok": false, "status": err.status.as_u16(), "result": err.body() })
            }
        })
        .collect();
    Ok(Json(Value::Array(out)))
}
