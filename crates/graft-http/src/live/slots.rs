//! How many event streams may be open at once, in all and per token.
//!
//! An event stream is long-lived: it holds a connection, a task and a queue
//! of up to a page of frames that its client has not taken yet. Without a
//! bound, one token (or many connections of one viewer) could open streams
//! until the node runs out of memory or file descriptors, and a dashboard
//! of an admin could not connect any more. So a stream takes a slot when it
//! opens and gives it back when its connection ends; a stream over either
//! bound is refused at once with `429 too_many_streams`.
//!
//! Invariants: the counts are changed under one lock, so two streams opening
//! together cannot both take the last slot; a slot is given back exactly
//! once (its `Drop`), whatever ends the stream (the client leaving, the
//! server shutting down, a panic in the body).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;

use crate::errors::ApiError;

/// Bounds on open event streams (`GET /api/v1/events/stream`).
///
/// ```
/// let limits = graft_http::live::StreamLimits { total: 64, per_token: 8 };
/// let live = graft_http::Live::new(graft::Node::new());
/// live.set_stream_limits(limits);
/// assert_eq!(live.stream_limits(), limits);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams open at once on this API.
    pub total: usize,
    /// Streams open at once for one token (sessions count as their token).
    pub per_token: usize,
}

impl Default for StreamLimits {
    /// 512 in all, 128 per token: room for many dashboards and `graft events
    /// --follow`s, while a stalled stream holds pointers to shared frames
    /// (see `stream::Ready`), not copies, so the bound is on connections and
    /// tasks more than on memory.
    fn default() -> Self {
        StreamLimits {
            total: 512,
            per_token: 128,
        }
    }
}

/// The open streams, per token.
pub(crate) struct StreamSlots {
    state: Mutex<Open>,
}

struct Open {
    limits: StreamLimits,
    total: usize,
    per_token: HashMap<String, usize>,
}

/// One open stream's place; given back on drop.
pub(crate) struct StreamSlot {
    slots: Arc<StreamSlots>,
    token: String,
}

impl StreamSlots {
    pub(crate) fn new(limits: StreamLimits) -> StreamSlots {
        StreamSlots {
            state: Mutex::new(Open {
                limits,
                total: 0,
                per_token: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        // Plain counts: a panic elsewhere leaves them consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn limits(&self) -> StreamLimits {
        self.lock().limits
    }

    /// New bounds; streams already open stay open.
    pub(crate) fn set_limits(&self, limits: StreamLimits) {
        self.lock().limits = limits;
    }

    /// Streams open now: in all, and for `token`.
    #[cfg(test)]
    pub(crate) fn open(&self, token: &str) -> (usize, usize) {
        let open = self.lock();
        (open.total, open.per_token.get(token).copied().unwrap_or(0))
    }

    /// A slot for a stream of `token` (`""` for a caller without one), or
    /// `429 too_many_streams` naming the bound that is full.
    pub(crate) fn take(self: &Arc<Self>, token: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.lock();
        let limits = open.limits;
        let mine = open.per_token.get(token).copied().unwrap_or(0);
        let refuse = |what: &str, limit: usize| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "{what} has {limit} event streams open, the most allowed; close one (another \
                     dashboard tab, a `graft events --follow`) and connect again"
                ),
            )
            .with("limit", limit)
        };
        if open.total >= limits.total {
            return Err(refuse("the node", limits.total));
        }
        if mine >= limits.per_token {
            return Err(refuse("this token", limits.per_token));
        }
        open.total += 1;
        open.per_token.insert(token.to_owned(), mine + 1);
        Ok(StreamSlot {
            slots: self.clone(),
            token: token.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_token.get_mut(&self.token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_token.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_in_all_and_per_token_and_come_back_on_drop() {
        let slots = Arc::new(StreamSlots::new(StreamLimits {
            total: 3,
            per_token: 2,
        }));
        let a1 = slots.take("a").expect("a1");
        let _a2 = slots.take("a").expect("a2");
        let err = slots.take("a").err().expect("a's third is refused");
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.error["kind"], "too_many_streams");
        assert_eq!(err.error["limit"], 2);
        let _b1 = slots.take("b").expect("b1");
        let err = slots.take("c").err().expect("the node is full");
        assert_eq!(err.error["limit"], 3);
        assert_eq!(slots.open("a"), (3, 2));
        drop(a1);
        assert_eq!(slots.open("a"), (2, 1));
        let _c1 = slots.take("c").expect("a freed slot is taken again");
        // Raising the bounds admits more at once.
        slots.set_limits(StreamLimits {
            total: 10,
            per_token: 10,
        });
        let _a3 = slots.take("a").expect("after raising");
        assert_eq!(slots.open("a"), (4, 2));
    }

    #[test]
    fn many_threads_never_pass_the_bound() {
        let slots = Arc::new(StreamSlots::new(StreamLimits {
            total: 50,
            per_token: 50,
        }));
        let taken: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..20)
                            .filter_map(|_| slots.take("t").ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("taker"))
                .collect()
        });
        assert_eq!(taken.len(), 50);
        assert_eq!(slots.open("t"), (50, 50));
        drop(taken);
        assert_eq!(slots.open("t"), (0, 0));
    }
}
