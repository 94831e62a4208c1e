//! Options of a reload across many sandboxes.

use crate::upgrade::ReloadOptions;

/// How [`Node::reload_batch`](super::Node::reload_batch) runs: the options of each sandbox's reload,
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
