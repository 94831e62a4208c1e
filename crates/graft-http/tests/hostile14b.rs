//! Hostile review (round 2) of the live-endpoint fixes: stream re-checks,
//! gap ordering, reset gaps, counters from the log's counts. Each test
//! states what a user would expect and failed before its fix.

mod support;

use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures_util::StreamExt;
use graft::NodeLimits;
use http_body_util::BodyExt;
use serde_json::json;
use support::Api;
use tower::ServiceExt;

async fn open(router: &Router, uri: &str) -> BodyDataStream {
    let resp = router
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{uri}");
    resp.into_body().into_data_stream()
}

/// Every frame that arrives within `wait` of the previous one: (id, is a gap).
async fn drain(body: &mut BodyDataStream, wait: Duration) -> Vec<(u64, bool)> {
    let mut buf = String::new();
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(wait, body.next()).await {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    buf.split("\n\n")
        .filter_map(|frame| {
            let gap = frame.lines().any(|l| l == "event: gap");
            let id = frame.lines().find_map(|l| l.strip_prefix("id: "))?;
            Some((id.parse().unwrap(), gap))
        })
        .collect()
}

async fn create(api: &Api, id: &str) {
    let (s, v) = api
        .post(
            "/api/v1/sandboxes",
            json!({ "id": id, "modules": { "counter": support::COUNTER } }),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn crash(api: &Api, sandbox: &str, n: usize) {
    let src = format!(
        "for i=1,{n} do local p = graft.spawn(\"counter\") pcall(graft.call, p, \"crash\") end return 1"
    );
    let (s, v) = api
        .post(
            &format!("/api/v1/sandboxes/{sandbox}/eval"),
            json!({ "source": src }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// FINDING (wrong answer): observability.md says events inside a gap's
/// range that are still kept "are sent *before* the gap frame", but the
/// stream reads one page of 256 (`PAGE`) and then moves its position to the
/// gap's `up_to`: when more than 256 kept events lie below `up_to` (here
/// 300 quiet sandboxes' creations below a busy sandbox's pruned numbers,
/// with `--max-events 5`), the kept ones past the first page are never sent
/// on the stream, though `GET /api/v1/events?after=0` returns them. On the
/// real binary: 45 of 306 kept events (seq 271..=315) missing.
#[tokio::test]
async fn every_kept_event_below_a_gap_is_streamed() {
    let api = Api::with_limits(NodeLimits {
        max_events: 5,
        ..NodeLimits::default()
    });
    create(&api, "a").await;
    crash(&api, "a", 10).await;
    for i in 0..300 {
        create(&api, &format!("s{i}")).await;
    }
    crash(&api, "a", 10).await;
    let (s, page) = api.get("/api/v1/events?after=0").await;
    assert_eq!(s, StatusCode::OK);
    let kept: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(kept.len() > 300, "{}", kept.len());
    let mut body = open(&api.as_admin(), "/api/v1/events/stream?after=0").await;
    let got = drain(&mut body, Duration::from_millis(500)).await;
    let ids: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let streamed: Vec<u64> = got.iter().filter(|g| !g.1).map(|g| g.0).collect();
    let missing: Vec<u64> = kept
        .iter()
        .copied()
        .filter(|k| !streamed.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} kept events never streamed: {missing:?}",
        missing.len()
    );
}

/// FINDING (wrong answer, race): a reader that just saw the newest event
/// must not be reset. The page and the stream decide "past the head" by
/// the node's watch value (`subscribe_events`), which the log raises only
/// after it released its lock, while reads see the log's `visible` at once:
/// `last_seq` (or a frame's id) can be one the watch does not show yet, and
/// asking again from it gets `{"reset": true}` and the whole log again. On
/// the real binary (4 sandboxes crashing in loops, one client paging with
/// `after=<previous last_seq>`): 89 resets in 176,149 pages over 40 s.
#[test]
fn a_reader_at_the_newest_event_is_never_reset() {
    let api = Api::with_limits(NodeLimits {
        max_events: 100,
        ..NodeLimits::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..3 {
            create(&api, &format!("r{i}")).await;
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = (0..3)
        .map(|i| {
            let node = api.node.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let sb = node.sandbox(&format!("r{i}")).unwrap();
                let src = "for i=1,500 do local p = graft.spawn(\"counter\") pcall(graft.call, p, \"crash\") end return 1";
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = graft::block_on(sb.eval(src));
                }
            })
        })
        .collect();
    let resets = rt.block_on(async {
        let mut last = 0;
        let mut resets = Vec::new();
        let until = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < until && resets.is_empty() {
            let (s, v) = api
                .get(&format!("/api/v1/events?after={last}&kind=none_of_these"))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["gap"]["reset"] == json!(true) {
                resets.push((last, v["gap"].clone()));
            }
            last = v["last_seq"].as_u64().unwrap();
        }
        resets
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in loads {
        t.join().unwrap();
    }
    assert!(
        resets.is_empty(),
        "a reader resuming from the last_seq it was just given was reset: {resets:?}"
    );
}

async fn metrics_text(api: &Api) -> String {
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, api.bearer())
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn series(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum()
}

/// FINDING (low, wrong answer): a sandbox deleted and created again with
/// the same id continues the deleted one's counters: the new `c` has had
/// one crash and no reload, and `/metrics` says 4 crashes and 2 reloads
/// (the old incarnation's). Whether it continues depends on whether 16
/// other sandboxes were deleted in between (the bucket is dropped then) and
/// on a restart (only kept events are counted again), so the same history
/// gives different counts.
#[tokio::test]
async fn a_recreated_sandbox_counts_from_zero() {
    let api = Api::new();
    create(&api, "c").await;
    crash(&api, "c", 3).await;
    for k in 2..4 {
        let src = support::COUNTER.replace("state.count += 1", &format!("state.count += {k}"));
        let (s, v) = api
            .post(
                "/api/v1/sandboxes/c/reload",
                json!({ "modules": { "counter": src } }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, _) = api.delete("/api/v1/sandboxes/c").await;
    assert!(s.is_success());
    create(&api, "c").await;
    crash(&api, "c", 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = metrics_text(&api).await;
    assert_eq!(
        series(&text, "graft_process_crashes_total{sandbox=\"c\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "graft_reloads_total{sandbox=\"c\",result=\"reload\"}"
        ),
        0.0
    );
}
