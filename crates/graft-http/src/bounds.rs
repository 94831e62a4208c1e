//! Every integer bound a request must respect (SPEC §7), in one place: the
//! handlers check requests with [`Bound::check`] and the OpenAPI document
//! states the same [`Bound`]s, so the two cannot disagree. The numbers come
//! from `graft::config` and the node's caps ([`NodeLimits`]).
//!
//! A bound is checked on the JSON number itself, before it is narrowed to a
//! Rust integer: `-1` or `1e30` is out of range (422 `limit_out_of_range`),
//! like `0`, rather than a shape error; `5.0` is the integer 5 (JSON Schema
//! counts it as one); `5.5` is a shape error (400).

use graft::config::{
    check_range, MAX_CANARY_MS, MAX_HANDLER_MS, MAX_MAILBOX, MAX_PROCESSES, MAX_SOURCE_BYTES,
    MAX_TIMEOUT_MS, MAX_VERSIONS, MIN_SANDBOX_MEMORY,
};
use graft::{Error, NodeLimits};
use serde_json::{Number, Value};

use crate::errors::{ApiError, ApiResult};

/// The largest `canary_crashes`. The library takes any `u32`; past a
/// million, a canary would never trip within its hour.
pub const MAX_CANARY_CRASHES: u64 = 1_000_000;

/// The smallest `max_message_bytes` and `max_source_bytes` the library
/// accepts (`graft::Limits::validate`).
const MIN_LIMIT_BYTES: u64 = 64;

/// `min ..= max` of one integer field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The field's name in the request (and in the error's `field`).
    pub field: &'static str,
    /// The smallest accepted value.
    pub min: u64,
    /// The largest accepted value.
    pub max: u64,
}

impl Bound {
    const fn new(field: &'static str, min: u64, max: u64) -> Bound {
        Bound { field, min, max }
    }

    /// The value of `n` if it is an integer in range; `limit_out_of_range`
    /// naming this field if it is an integer out of range; 400 if it has a
    /// fraction.
    pub fn check(&self, n: &Number) -> ApiResult<u64> {
        let out_of_range = || {
            ApiError::from(Error::LimitOutOfRange {
                field: self.field.to_owned(),
                value: n.to_string(),
                min: self.min,
                max: self.max,
            })
        };
        if let Some(v) = n.as_u64() {
            check_range(self.field, v, self.min, self.max)?;
            return Ok(v);
        }
        if n.is_i64() {
            // Negative: below every minimum.
            return Err(out_of_range());
        }
        match n.as_f64() {
            Some(f) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
                let v = f as u64;
                check_range(self.field, v, self.min, self.max)?;
                Ok(v)
            }
            Some(f) if f.fract() == 0.0 => Err(out_of_range()),
            _ => Err(ApiError::bad_request(
                "bad_request",
                format!("`{}` must be an integer, not {n}", self.field),
            )),
        }
    }

    /// [`Bound::check`] of an optional field: `None` (absent or `null`) is `default`.
    pub fn check_or(&self, n: Option<&Number>, default: u64) -> ApiResult<u64> {
        n.map_or(Ok(default), |n| self.check(n))
    }

    /// Checks a count (the length of a list named by this field).
    pub fn check_count(&self, n: usize) -> ApiResult<()> {
        check_range(self.field, n as u64, self.min, self.max)?;
        Ok(())
    }
}

/// `timeout_ms` of `call` and `eval`.
pub fn timeout_ms() -> Bound {
    Bound::new("timeout_ms", 1, MAX_TIMEOUT_MS)
}

/// `canary_ms` of a reload (0: no canary).
pub fn canary_ms() -> Bound {
    Bound::new("canary_ms", 0, MAX_CANARY_MS)
}

/// `canary_crashes` of a reload.
pub fn canary_crashes() -> Bound {
    Bound::new("canary_crashes", 1, MAX_CANARY_CRASHES)
}

/// `version` of a rollback (versions are `u32`, numbered from 1).
pub fn version() -> Bound {
    Bound::new("version", 1, u64::from(u32::MAX))
}

/// The largest event number a client may pass as `since`: the largest
/// integer a JSON reader that uses doubles (JavaScript) holds exactly. A
/// sandbox numbers its events one by one, so it never gets there.
pub const MAX_EVENT_SEQ: u64 = (1 << 53) - 1;

/// `since` of `GET /sandboxes/{id}/events` (0: every kept event).
pub fn since() -> Bound {
    Bound::new("since", 0, MAX_EVENT_SEQ)
}

/// `max_concurrency` of a batch reload: more than the node can hold
/// sandboxes would never be used.
pub fn max_concurrency(node: &NodeLimits) -> Bound {
    Bound::new("max_concurrency", 1, node.max_sandboxes as u64)
}

/// The number of `sandboxes` in a batch reload.
pub fn batch_size(node: &NodeLimits) -> Bound {
    Bound::new("sandboxes", 0, node.max_sandboxes as u64)
}

/// The ranges of `graft::Limits`' fields under the node's caps, as
/// `graft::Limits::validate` checks them.
pub fn limits(node: &NodeLimits) -> [Bound; 7] {
    let min_memory = MIN_SANDBOX_MEMORY as u64;
    [
        Bound::new(
            "memory_bytes",
            min_memory,
            (node.max_sandbox_memory as u64).max(min_memory),
        ),
        Bound::new("handler_ms", 1, MAX_HANDLER_MS),
        Bound::new("max_processes", 1, MAX_PROCESSES),
        Bound::new("max_mailbox", 1, MAX_MAILBOX),
        Bound::new("max_versions", 1, MAX_VERSIONS),
        Bound::new(
            "max_message_bytes",
            MIN_LIMIT_BYTES,
            (node.max_value_bytes as u64).max(MIN_LIMIT_BYTES),
        ),
        Bound::new("max_source_bytes", MIN_LIMIT_BYTES, MAX_SOURCE_BYTES),
    ]
}

/// Checks the limits given in a request (a JSON object) and writes each as
/// the integer it stands for, so that `5.0` deserializes as `5`.
pub fn check_limits(map: &mut serde_json::Map<String, Value>, node: &NodeLimits) -> ApiResult<()> {
    for bound in limits(node) {
        if let Some(Value::Number(n)) = map.get(bound.field) {
            let v = bound.check(n)?;
            map.insert(bound.field.to_owned(), Value::from(v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(v: Value) -> Number {
        match v {
            Value::Number(n) => n,
            other => panic!("not a number: {other}"),
        }
    }

    #[test]
    fn integers_in_range_pass_and_others_name_field_and_range() {
        let b = timeout_ms();
        assert_eq!(b.check(&num(json!(1))).unwrap(), 1);
        assert_eq!(
            b.check(&num(json!(MAX_TIMEOUT_MS))).unwrap(),
            MAX_TIMEOUT_MS
        );
        assert_eq!(b.check(&num(json!(250.0))).unwrap(), 250);
        for bad in [
            json!(0),
            json!(MAX_TIMEOUT_MS + 1),
            json!(-1),
            json!(1e30),
            json!(u64::MAX),
        ] {
            let err = b.check(&num(bad.clone())).unwrap_err();
            assert_eq!(err.status.as_u16(), 422, "{bad}");
            assert_eq!(err.error["kind"], "limit_out_of_range");
            assert_eq!(err.error["field"], "timeout_ms");
            assert_eq!(err.error["min"], 1);
            assert_eq!(err.error["max"], MAX_TIMEOUT_MS);
        }
        let err = b.check(&num(json!(2.5))).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert_eq!(err.error["kind"], "bad_request");
    }

    #[test]
    fn limits_follow_the_node_caps() {
        let node = NodeLimits {
            max_sandbox_memory: 64 << 20,
            max_value_bytes: 4096,
            ..NodeLimits::default()
        };
        let b = limits(&node);
        assert_eq!(b[0].max, 64 << 20);
        assert_eq!(b[5].max, 4096);
        let mut map = json!({ "handler_ms": 20.0, "memory_bytes": 4194304 });
        let map = map.as_object_mut().unwrap();
        check_limits(map, &node).unwrap();
        assert_eq!(map["handler_ms"], json!(20));
        let mut map = json!({ "memory_bytes": 1u64 << 31 });
        let err = check_limits(map.as_object_mut().unwrap(), &node).unwrap_err();
        assert_eq!(err.error["field"], "memory_bytes");
        assert_eq!(err.error["max"], 64 << 20);
    }

    /// The table must say what `graft::Limits::validate` does, at both ends
    /// of every range.
    #[test]
    fn the_table_agrees_with_the_library() {
        let node = NodeLimits::default();
        let defaults = serde_json::to_value(graft::Limits::default()).unwrap();
        for b in limits(&node) {
            let with = |v: u64| {
                let mut l = defaults.clone();
                l[b.field] = json!(v);
                serde_json::from_value::<graft::Limits>(l).unwrap()
            };
            assert!(with(b.min).validate(&node).is_ok(), "{} = min", b.field);
            assert!(with(b.max).validate(&node).is_ok(), "{} = max", b.field);
            for bad in [b.min.checked_sub(1), b.max.checked_add(1)]
                .into_iter()
                .flatten()
            {
                match with(bad).validate(&node) {
                    Err(Error::LimitOutOfRange {
                        field, min, max, ..
                    }) => {
                        assert_eq!((field.as_str(), min, max), (b.field, b.min, b.max))
                    }
                    other => panic!("{} = {bad}: {other:?}", b.field),
                }
            }
        }
    }
}
