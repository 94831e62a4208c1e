//! Internals that Graft's own benchmarks (`graft-bench`) and fuzz targets
//! (`fuzz/`) drive directly: not part of the embedding API, not covered by
//! semver, hidden from the docs, and compiled only with the `internals`
//! feature, which those two crates enable and an embedder never needs.
//!
//! Everything here is a re-export of a `pub(crate)` item, so the crate's
//! own code and these callers share one implementation:
//! * [`compile`]: source → bytecode, the single call into the Luau compiler
//!   (bounded by `max_source_bytes` and [`crate::vm::COMPILE_TIMEOUT`]);
//! * [`prepare`] with [`PrepareContext`]: compile + static checks of a set
//!   of sources, the first half of every reload, import and creation;
//! * [`safe_globals`], [`known_globals`]: the globals the static check
//!   accepts, as a sandbox would compute them;
//! * [`lua_to_json`]: the bounded, cycle-checked conversion of a Luau value.
//!
//! ```
//! use std::collections::BTreeMap;
//! use graft::internals::{known_globals, prepare, PrepareContext};
//! let known = known_globals(&[], &BTreeMap::new());
//! let files = BTreeMap::new();
//! let cx = PrepareContext { known_globals: &known, max_source_bytes: 1 << 20, files: &files };
//! let sources = BTreeMap::from([("m".to_owned(), "return {}".to_owned())]);
//! let prepared = prepare(&sources, &cx).unwrap();
//! assert_eq!(prepared[0].name, "m");
//! assert!(graft::internals::compile("m", "m.luau", "return (", 1 << 20).is_err());
//! ```

// The items are `pub` in `pub(crate)` modules: reachable from outside only
// through these re-exports.
pub use crate::upgrade::prepare::{prepare, PrepareContext, PreparedModule};
pub use crate::value::to_json::lua_to_json;
pub use crate::vm::compile::compile;
pub use crate::vm::env::safe_globals;

use std::collections::BTreeMap;

use crate::vm::HostFn;

/// Names a module may use as globals in a sandbox with these grants and
/// host functions: what `prepare`'s static check accepts there.
///
/// ```
/// let known = graft::internals::known_globals(&["clock".into()], &Default::default());
/// assert!(known.iter().any(|g| g == "os") && known.iter().any(|g| g == "graft"));
/// ```
pub fn known_globals(grants: &[String], host_fns: &BTreeMap<String, HostFn>) -> Vec<String> {
    crate::vm::globals_for(grants, host_fns)
}
