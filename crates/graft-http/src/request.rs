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

/// `%XX` and `+` decoding of one query value; `None` when an escape is
/// malformed or the result is not UTF-8. Every query parser uses it.
///
/// ```text
/// a%20b+c -> "a b c"    %4 -> None    %+1 -> None    %FF -> None (not UTF-8)
/// ```
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                // Two hex digits, nothing else (`from_str_radix` alone would
                // take a sign: `%+1`).
                let hex = s
                    .get(i + 1..i + 3)
                    .filter(|h| h.bytes().all(|d| d.is_ascii_hexdigit()))?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode_strictly() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("").as_deref(), Some(""));
        for bad in ["%", "%4", "%+1", "%-1", "%zz", "%FF", "a%C3"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
