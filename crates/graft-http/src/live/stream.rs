//! `GET /api/v1/events/stream`: every node event as Server-Sent Events
//! (its query is parsed in `query.rs`).
//!
//! Each event is one frame, `id:` its node-wide seq and `data:` the event as
//! JSON (no `event:` field, so a browser's `onmessage` sees every kind).
//! Where to start: the `Last-Event-ID` header (a reconnecting client), else
//! `?after=N`, else `?tail=N` (the last N kept events), else only new
//! events. A reader whose position was pruned from the feed first gets one
//! `event: gap` frame `{"after": A, "up_to": U}` (events `A < seq <= U`
//! matching its filters may be lost; its `id` is U, so a reconnect does not
//! repeat it). Filters: `?sandbox=ID` and `?kind=K` (repeatable, or
//! comma-separated). Idle streams get a keep-alive comment.
//!
//! Invariants: frames go out in seq order with no seq twice; a stream reads
//! only the feed, never a sandbox, and holds no lock while it waits for the
//! client to take a frame (a slow client falls behind and is told by a gap).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::RawQuery;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio::sync::watch;

use super::feed::{EventFilter, EventGap, EventSource, NodeEvent};
use super::query::parse;
pub use super::query::{MAX_KINDS, MAX_KIND_BYTES};
use super::slots::StreamSlot;
use super::Live;
use crate::errors::ApiError;

/// Events read from the feed per page.
const PAGE: usize = 256;
/// How long a stream that was waiting lets new events gather before it
/// reads them: a burst (a reload's events, a batch, a crash loop) then goes
/// out as one read of the log and one write per client instead of one per
/// event, which is what keeps a hundred open dashboards from slowing the
/// reloads they watch. Far below what a person notices.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Events whose JSON the cache keeps.
const CACHED_FRAMES: usize = 4_096;

/// The JSON of recent events, serialized once for every stream that sends
/// them (a hundred clients of one event cost one serialization, not a
/// hundred). Bounded: the oldest entries go first.
#[derive(Default)]
pub struct FrameCache {
    json: Mutex<BTreeMap<u64, Arc<str>>>,
}

impl FrameCache {
    /// The JSON text of `e`, from the cache or serialized now.
    fn json(&self, e: &NodeEvent) -> Arc<str> {
        let mut json = self.json.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(text) = json.get(&e.seq) {
            return text.clone();
        }
        let text: Arc<str> = serde_json::to_string(e)
            .unwrap_or_else(|_| "{}".into())
            .into();
        json.insert(e.seq, text.clone());
        while json.len() > CACHED_FRAMES {
            json.pop_first();
        }
        text
    }
}

/// A frame read from the log and not yet taken by the client. The event's
/// JSON is the cache's shared text, so a stalled client holds pointers, not
/// copies: up to [`PAGE`] of them.
enum Ready {
    Event(u64, Arc<str>),
    Gap(EventGap),
    /// The reader's position (here) is past the newest event of this log:
    /// the log restarted (a node without a data dir was restarted) or the
    /// position came from elsewhere. What follows is the log from its start.
    Reset(u64),
}

impl Ready {
    fn frame(self) -> SseEvent {
        match self {
            Ready::Event(seq, json) => SseEvent::default().id(seq.to_string()).data(&*json),
            Ready::Gap(gap) => {
                let data = json!({ "after": gap.after, "up_to": gap.up_to }).to_string();
                SseEvent::default()
                    .event("gap")
                    .id(gap.up_to.to_string())
                    .data(data)
            }
            Ready::Reset(after) => SseEvent::default()
                .event("gap")
                .id("0")
                .data(reset_json(after).to_string()),
        }
    }
}

/// The gap of a reader whose position `after` is past the newest event:
/// `up_to` 0 and `reset`, so a client that reads `up_to` as where to go on
/// starts from the beginning of this log.
fn reset_json(after: u64) -> serde_json::Value {
    json!({ "after": after, "up_to": 0, "reset": true })
}

/// Where a reader at `pos` reads from, and `Some(pos)` when that position
/// is past `head` (the log's newest event, read under its lock): it is
/// from another log, and this one is read from its start.
fn resume_at(pos: u64, head: u64) -> (u64, Option<u64>) {
    if pos > head {
        (0, Some(pos))
    } else {
        (pos, None)
    }
}

/// Checks that the stream's caller may still read (its token was not
/// revoked, its session did not end); see [`RECHECK`].
pub(crate) type StillAllowed = Box<dyn Fn() -> bool + Send + Sync>;

/// How often an idle stream checks its caller again (a stream checks before
/// every read of the log too): a revoked token or an ended session gets no
/// event logged after the revocation, and its connection ends within this
/// time even on an idle node.
pub const RECHECK: Duration = Duration::from_secs(1);

/// What a stream is opened with besides its source and position.
pub(crate) struct Opened {
    /// The stream's place among the open ones, given back when it ends
    /// (held, never read: its `Drop` is what counts).
    #[allow(dead_code)]
    pub slot: Option<StreamSlot>,
    pub still_allowed: Option<StillAllowed>,
    /// `Some(position)` when the reader's position was past the head.
    pub reset: Option<u64>,
}

/// The stream's cursor between frames.
struct Cursor {
    source: Arc<dyn EventSource>,
    cache: Arc<FrameCache>,
    rx: watch::Receiver<u64>,
    /// Every matching event up to here was read (or reported in a gap).
    pos: u64,
    filter: EventFilter,
    ready: VecDeque<Ready>,
    batch: Duration,
    opened: Opened,
}

impl Cursor {
    /// Whether the caller may still read (a hash and a map lookup: cheap
    /// next to the read of the log it guards).
    fn allowed(&self) -> bool {
        self.opened
            .still_allowed
            .as_ref()
            .is_none_or(|check| check())
    }
}

/// The frames of `source` after `pos` matching `filter`, forever. A stream
/// that caught up waits for new events, then `batch` more, before reading.
pub(crate) fn frames(
    source: Arc<dyn EventSource>,
    cache: Arc<FrameCache>,
    pos: u64,
    filter: EventFilter,
    batch: Duration,
    opened: Opened,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let rx = source.subscribe();
    let mut ready = VecDeque::new();
    if let Some(after) = opened.reset {
        ready.push_back(Ready::Reset(after));
    }
    let cursor = Cursor {
        source,
        cache,
        rx,
        pos,
        filter,
        ready,
        batch,
        opened,
    };
    // Fused: a body polled again after it ended gets `None`, not a panic.
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(f) = c.ready.pop_front() {
                return Some((Ok(f.frame()), c));
            }
            if !c.allowed() {
                // The caller's token was revoked or its session ended: the
                // stream ends before it reads more, and the client's
                // reconnect gets a 401.
                return None;
            }
            // Everything up to `head` is readable now.
            let head = *c.rx.borrow_and_update();
            let page = c.source.events_after(c.pos, &c.filter, PAGE);
            // Frames go out in seq order: events still kept at or below the
            // gap's end (another sandbox's, pruned less) come before it.
            // When the page ends before the gap does (more kept events
            // there than a page holds), the gap waits: the next read, from
            // the page's end, reports it again with the rest.
            let gap = page.gap.filter(|g| page.through >= g.up_to);
            let up_to = gap.map_or(0, |g| g.up_to);
            let (before, after): (Vec<_>, Vec<_>) =
                page.events.iter().partition(|e| e.seq <= up_to);
            for e in before {
                c.ready.push_back(Ready::Event(e.seq, c.cache.json(e)));
            }
            if let Some(gap) = gap {
                c.ready.push_back(Ready::Gap(gap));
                c.pos = c.pos.max(gap.up_to);
            }
            for e in after {
                c.ready.push_back(Ready::Event(e.seq, c.cache.json(e)));
            }
            c.pos = c.pos.max(page.through);
            if !c.ready.is_empty() {
                continue;
            }
            if c.pos < head {
                // The read stopped at its scan bound with nothing matching
                // (a rare kind over a long log): go on from `through`, but
                // let the other tasks of this thread run first.
                tokio::task::yield_now().await;
                continue;
            }
            let changed = if c.opened.still_allowed.is_some() {
                // Wake at least every RECHECK to check the caller again.
                match tokio::time::timeout(RECHECK, c.rx.changed()).await {
                    Ok(changed) => changed,
                    Err(_) if c.allowed() => continue,
                    Err(_) => return None,
                }
            } else {
                c.rx.changed().await
            };
            if changed.is_err() {
                return None;
            }
            if !c.batch.is_zero() {
                tokio::time::sleep(c.batch).await;
            }
        }
    })
    .fuse()
}

/// Events `GET /api/v1/events` answers at most.
pub const MAX_PAGE: usize = 1_000;

/// `GET /api/v1/events`: one page of node events as JSON, from the same
/// query as the stream (`after`, `tail`, `sandbox`, `kind`; default: the
/// last 100), with `last_seq`, the highest seq readable now, to resume from.
pub(crate) async fn page(
    Extension(live): Extension<Live>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let start = parse(query.as_deref().unwrap_or(""), &headers)?;
    let source = live.source();
    let head = live.head();
    let (pos, limit) = match (start.after, start.tail) {
        (Some(after), tail) => (after, tail.map_or(MAX_PAGE, |t| t as usize)),
        (None, tail) => {
            // The newest events the page can hold, not the oldest of the tail.
            let tail = tail.unwrap_or(100).min(MAX_PAGE as u64);
            (head.saturating_sub(tail), tail as usize)
        }
    };
    let mut filter = EventFilter::default();
    filter.sandbox = start.filter_sandbox;
    filter.kinds = start.kinds;
    let limit = limit.min(MAX_PAGE);
    // A position past the newest event is from another log (see
    // `Ready::Reset`): say so and read this log from its start.
    let (from, reset) = resume_at(pos, head);
    let page = source.events_after(from, &filter, limit);
    let gap = match reset {
        Some(after) => reset_json(after),
        None => json!(page.gap),
    };
    // Where to resume: every match up to `through` is in this page (a full
    // page, or one that met the scan bound, stops short of the head).
    let last_seq = page.through;
    Ok(axum::Json(json!({
        "events": page.events,
        "gap": gap,
        "last_seq": last_seq,
    })))
}

/// `GET /api/v1/events/stream`.
pub(crate) async fn stream(
    Extension(live): Extension<Live>,
    axum::extract::State(trust): axum::extract::State<Arc<crate::trust::Trust>>,
    caller: Option<Extension<crate::trust::Caller>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let start = parse(query.as_deref().unwrap_or(""), &headers)?;
    let token = caller.as_ref().map_or("", |c| &*c.token_id);
    let slot = live.stream_slots().take(token)?;
    let source = live.source();
    let head = live.head();
    let pos = match (start.after, start.tail) {
        (Some(after), _) => after,
        (None, Some(tail)) => head.saturating_sub(tail),
        (None, None) => head,
    };
    let mut filter = EventFilter::default();
    filter.sandbox = start.filter_sandbox;
    filter.kinds = start.kinds;
    let (from, reset) = resume_at(pos, head);
    // The credentials that opened the stream are checked again while it
    // runs (a request without any passed no authentication to check).
    let has_credentials = headers.contains_key(axum::http::header::AUTHORIZATION)
        || crate::trust::session::session_cookie(&headers).is_some();
    let still_allowed: Option<StillAllowed> = has_credentials.then(|| {
        Box::new(move || crate::trust::middleware::credentials(&trust, &headers).is_ok())
            as StillAllowed
    });
    let opened = Opened {
        slot: Some(slot),
        still_allowed,
        reset,
    };
    let sse = Sse::new(frames(
        source,
        live.frame_cache(),
        from,
        filter,
        live.batch_window(),
        opened,
    ))
    .keep_alive(
        KeepAlive::new()
            .interval(live.keep_alive())
            .text("keep-alive"),
    );
    Ok(sse.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::feed::{EventPage, Feed, KEEP_EVENTS};
    use futures_util::StreamExt;
    use std::time::Duration;

    /// The frames of `feed` after `pos`, each sent as soon as it is read.
    fn unbatched(
        feed: &Arc<Feed>,
        pos: u64,
        filter: EventFilter,
    ) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
        frames(
            feed.clone(),
            Default::default(),
            pos,
            filter,
            Duration::ZERO,
            Opened {
                slot: None,
                still_allowed: None,
                reset: None,
            },
        )
    }

    /// The text of a frame as it goes on the wire.
    async fn wire(frames: Vec<SseEvent>) -> String {
        let s = Sse::new(stream::iter(frames.into_iter().map(Ok::<_, Infallible>)));
        let body = s.into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    async fn take(s: impl Stream<Item = Result<SseEvent, Infallible>> + Send, n: usize) -> String {
        let got: Vec<SseEvent> = tokio::time::timeout(
            Duration::from_secs(5),
            s.take(n).map(|r| r.unwrap()).collect::<Vec<_>>(),
        )
        .await
        .expect("frames in time");
        wire(got).await
    }

    fn ids(text: &str) -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|v| v.parse().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn resumes_after_a_position_in_order_without_duplicates() {
        let feed = Arc::new(Feed::default());
        for i in 0..5 {
            feed.push("a", 0.0, "reload", json!({ "i": i }));
        }
        let text = take(unbatched(&feed, 2, EventFilter::default()), 3).await;
        assert_eq!(ids(&text), vec![3, 4, 5]);
        assert!(text.contains("\"kind\":\"reload\""));
        // Live events arrive after the stored ones, once each.
        let s = unbatched(&feed, 4, EventFilter::default());
        let f2 = feed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            f2.push("a", 0.0, "crash", json!({}));
            f2.push("b", 0.0, "reload", json!({}));
        });
        let text = take(s, 3).await;
        assert_eq!(ids(&text), vec![5, 6, 7]);
    }

    #[tokio::test]
    async fn filters_by_sandbox_and_kind() {
        let feed = Arc::new(Feed::default());
        feed.push("a", 0.0, "reload", json!({}));
        feed.push("b", 0.0, "reload", json!({}));
        feed.push("a", 0.0, "crash", json!({}));
        feed.push("a", 0.0, "reload", json!({}));
        let f = EventFilter::default().sandbox("a").kind("reload");
        let text = take(unbatched(&feed, 0, f), 2).await;
        assert_eq!(ids(&text), vec![1, 4]);
        assert!(!text.contains("\"sandbox\":\"b\""));
    }

    #[tokio::test]
    async fn a_reader_behind_the_kept_events_gets_one_gap_frame_first() {
        let feed = Arc::new(Feed::default());
        for _ in 0..(KEEP_EVENTS + 10) {
            feed.push("a", 0.0, "reload", json!({}));
        }
        let text = take(unbatched(&feed, 3, EventFilter::default()), 3).await;
        let gap = text.split("\n\n").next().unwrap();
        assert!(gap.contains("event: gap"), "{text}");
        assert!(
            gap.contains("\"after\":3") && gap.contains("\"up_to\":10"),
            "{gap}"
        );
        assert_eq!(ids(&text), vec![10, 11, 12]);
    }

    #[tokio::test]
    async fn a_rare_kind_past_the_scan_bound_still_arrives() {
        let feed = Arc::new(Feed::default());
        let misses = graft::MAX_SCAN * 2 + 7;
        for _ in 0..misses {
            feed.push("a", 0.0, "reload", json!({}));
        }
        feed.push("a", 0.0, "crash", json!({}));
        let only_crashes = EventFilter::default().kind("crash");
        let page = feed.events_after(0, &only_crashes, PAGE);
        assert!(page.events.is_empty() && page.through < misses as u64);
        let text = tokio::time::timeout(
            Duration::from_secs(10),
            take(unbatched(&feed, 0, only_crashes), 1),
        )
        .await
        .expect("the crash arrives");
        assert_eq!(ids(&text), vec![misses as u64 + 1]);
    }

    /// A source that counts the reads made of it.
    struct Counting {
        feed: Arc<Feed>,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl EventSource for Counting {
        fn events_after(&self, after: u64, filter: &EventFilter, limit: usize) -> EventPage {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.feed.events_after(after, filter, limit)
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.feed.subscribe()
        }
    }

    #[tokio::test]
    async fn a_burst_of_events_is_read_and_serialized_once_for_all_streams() {
        let feed = Arc::new(Feed::default());
        let source = Arc::new(Counting {
            feed: feed.clone(),
            reads: Default::default(),
        });
        let cache = Arc::new(FrameCache::default());
        let streams: Vec<_> = (0..3)
            .map(|_| {
                frames(
                    source.clone(),
                    cache.clone(),
                    0,
                    EventFilter::default(),
                    Duration::from_millis(300),
                    Opened {
                        slot: None,
                        still_allowed: None,
                        reset: None,
                    },
                )
            })
            .collect();
        let f2 = feed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for i in 0..20 {
                f2.push("a", 0.0, "reload", json!({ "i": i }));
            }
        });
        for s in streams {
            let text = take(s, 20).await;
            assert_eq!(ids(&text), (1..=20).collect::<Vec<_>>());
        }
        // Each stream: one read before it waited, then the whole burst in
        // one read after the window (not one read per event).
        let reads = source.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reads <= 3 * 2, "{reads} reads for 3 streams and one burst");
        // Serialized once: the cache holds each event's JSON once.
        assert_eq!(cache.json.lock().unwrap().len(), 20);
    }

    #[test]
    fn parses_filters_and_refuses_hostile_queries() {
        let h = HeaderMap::new();
        let s = parse("sandbox=app&kind=reload,crash&kind=abort&after=7", &h).unwrap();
        assert_eq!(s.filter_sandbox.as_deref(), Some("app"));
        assert_eq!(s.kinds, vec!["reload", "crash", "abort"]);
        assert_eq!(s.after, Some(7));
        let mut h = HeaderMap::new();
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(parse("after=7", &h).unwrap().after, Some(42));
        h.insert("last-event-id", "-1".parse().unwrap());
        assert!(parse("", &h).is_err());
        let h = HeaderMap::new();
        for bad in [
            "after=-1",
            "after=1e9",
            "tail=99999999",
            "kind=Reload",
            "kind=a%ZZ",
            "sandbox=../x",
            "pid=1",
            &format!("kind={}", "a".repeat(65)),
            &format!("kind={}", vec!["a"; 33].join(",")),
        ] {
            assert!(parse(bad, &h).is_err(), "{bad} accepted");
        }
    }
}
