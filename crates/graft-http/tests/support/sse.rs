//! An SSE body read frame by frame, for the event-stream tests.

use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures_util::StreamExt;
use serde_json::Value;
use tower::ServiceExt;

/// An open SSE body and what was read of it.
pub struct Frames {
    body: BodyDataStream,
    buf: String,
}

impl Frames {
    /// Opens `uri` with `headers`; fails unless it is a 200 event stream.
    pub async fn open(router: &Router, uri: &str, headers: &[(&str, String)]) -> Frames {
        let mut req = Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        Frames {
            body: resp.into_body().into_data_stream(),
            buf: String::new(),
        }
    }

    /// The next frame (blank-line separated), raw.
    pub async fn next_raw(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let frame = self.buf[..i].to_owned();
                self.buf.drain(..i + 2);
                return Some(frame);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                _ => return None,
            }
        }
    }

    /// The next event frame: (id, event type, data), skipping comments.
    pub async fn next_event(&mut self, wait: Duration) -> Option<(u64, String, Value)> {
        loop {
            let raw = self.next_raw(wait).await?;
            let mut id = None;
            let mut kind = "message".to_owned();
            let mut data = String::new();
            for line in raw.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.parse().unwrap());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if let Some(id) = id {
                return Some((id, kind, serde_json::from_str(&data).unwrap()));
            }
        }
    }

    /// Fails unless the stream ends (its body finishes) within `wait`;
    /// keep-alive comments may come before.
    pub async fn ended_within(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(None) => return,
                Ok(Some(Ok(chunk))) => {
                    let text = std::str::from_utf8(&chunk).unwrap();
                    assert!(!text.contains("data:"), "an event after the end: {text}");
                }
                Ok(Some(Err(e))) => panic!("the stream failed instead of ending: {e}"),
                Err(_) => panic!("the stream still runs after {wait:?}"),
            }
        }
    }

    /// Every frame that arrives within `wait` of the previous one: (id, is a gap).
    pub async fn drain(&mut self, wait: Duration) -> Vec<(u64, bool)> {
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(wait, self.body.next()).await {
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        let mut out = Vec::new();
        for frame in self.buf.split("\n\n") {
            let gap = frame.lines().any(|l| l == "event: gap");
            if let Some(id) = frame.lines().find_map(|l| l.strip_prefix("id: ")) {
                out.push((id.parse().unwrap(), gap));
            }
        }
        self.buf.clear();
        out
    }
}
