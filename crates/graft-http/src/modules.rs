//! `/sandboxes/{id}/modules`: the loaded modules, the versions kept of one,
//! and rolling one back to a kept version.
//!
//! A rollback is a reload of the kept source (same transaction, same
//! answers as `reload`); its body takes the reload options but no canary.

use axum::extract::{Extension, Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use graft::Node;
use serde::Deserialize;
use serde_json::{json, Number, Value};

use crate::body::Body;
use crate::bounds;
use crate::errors::ApiResult;
use crate::reload::OptionsBody;
use crate::request::{module_param, sandbox};
use crate::trust::audit::EffectAudit;

pub(crate) async fn list(
    State(node): State<Node>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    Ok(Json(sb.modules().await?).into_response())
}

/// The kept versions, oldest first, each marked `current` or not.
pub(crate) async fn versions(
    State(node): State<Node>,
    UrlPath((id, module)): UrlPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let sb = sandbox(&node, &id)?;
    module_param(&module)?;
    let versions = sb.versions(&module).await?;
    let current = sb
        .modules()
        .await?
        .into_iter()
        .find(|m| m.name == module)
        .map(|m| m.version);
    let out = versions
        .into_iter()
        .map(|v| {
            let mut o = serde_json::to_value(&v).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut o {
                map.insert("current".into(), json!(Some(v.version) == current));
            }
            o
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackBody {
    version: Number,
    #[serde(default)]
    extra: Value,
    state_handler: Option<String>,
    dry_run: Option<bool>,
}

pub(crate) async fn rollback(
    State(node): State<Node>,
    UrlPath((id, module)): UrlPath<(String, String)>,
    audit: Option<Extension<EffectAudit>>,
    Body(body): Body<RollbackBody>,
) -> ApiResult<Response> {
    let sb = sandbox(&node, &id)?;
    module_param(&module)?;
    let version = bounds::version().check(&body.version)?;
    let mut opts = OptionsBody {
        extra: body.extra,
        state_handler: body.state_handler,
        dry_run: body.dry_run,
        ..Default::default()
    }
    .into_options()?;
    // The audit row commits with the rollback (SPEC §9).
    opts.attached = EffectAudit::of(audit.as_ref());
    // In range: the bound's maximum is u32::MAX.
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    Ok(Json(sb.rollback(&module, version, opts).await?).into_response())
}
