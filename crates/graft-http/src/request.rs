//! Checks every handler shares: a malformed sandbox id or module name in a
//! path is 400 `invalid_input` (in a body it is 422, from the library), and
//! a well-formed id of no sandbox is 404 `no_sandbox`.

use graft::{Node, Sandbox};

use crate::errors::{ApiError, ApiResult};

/// The sandbox named in the path.
pub(crate) fn sandbox(node: &Node, id: &str) -> ApiResult<Sandbox> {
    graft::config::validate_sandbox_id(id)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))?;
    Ok(node.sandbox(id)?)
}

/// A module name in the path: malformed is 400, like a bad sandbox id.
pub(crate) fn module_param(module: &str) -> ApiResult<()> {
    graft::config::validate_module_name(module)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))
}

/// A sandbox id given as a filter (no sandbox need exist): malformed is 400.
pub(crate) fn sandbox_name(id: &str) -> ApiResult<()> {
    graft::config::validate_sandbox_id(id)
        .map_err(|e| ApiError::bad_request("invalid_input", e.to_string()))
}
