//! The dashboard in a real browser: Debian's `chromium`, headless, driven
//! through the DevTools protocol by `chromiumoxide`. A node serves the API
//! on a real port; the page is loaded once and never reloaded.
//!
//! Without a `chromium` binary (see `.ci/run`, which installs it) the test
//! prints `SKIPPED` and why, and passes: it cannot be run, not "it worked".
//! `GRAFT_SCREENSHOTS=1 cargo test -p graft-http --test browser` also
//! writes the screenshots of docs/dashboard.md (docs/img/*.png).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{counter_v, Api};

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Evaluates `expr` in the page until it is truthy; its value.
async fn wait_js(page: &Page, what: &str, expr: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v: Value = page
            .evaluate(expr)
            .await
            .ok()
            .and_then(|r| r.value().cloned())
            .unwrap_or(Value::Null);
        let truthy =
            !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
        if truthy {
            return v;
        }
        if Instant::now() > deadline {
            let html: Value = page
                .evaluate("document.body.innerText.slice(0, 3000)")
                .await
                .ok()
                .and_then(|r| r.value().cloned())
                .unwrap_or(Value::Null);
            panic!("{what}: `{expr}` not true within {within:?}; page text:\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn js(page: &Page, expr: &str) -> Value {
    page.evaluate(expr)
        .await
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .value()
        .cloned()
        .unwrap_or(Value::Null)
}

async fn shot(page: &Page, name: &str) {
    if std::env::var_os("GRAFT_SCREENSHOTS").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/img");
    let _ = std::fs::create_dir_all(&dir);
    page.save_screenshot(
        ScreenshotParams::builder().build(),
        dir.join(format!("dashboard-{name}.png")),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_follows_events_dry_runs_applies_and_rolls_back() {
    let Some(exe) = chromium() else {
        eprintln!("SKIPPED: no chromium binary at /usr/bin/chromium (install Debian's `chromium`; .ci/run does)");
        return;
    };
    let api = Api::new();
    api.counter_app("shop").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = api.router.clone();
    tokio::spawn(async move { axum::serve(listener, served).await });

    let config = BrowserConfig::builder()
        .chrome_executable(exe)
        .no_sandbox()
        .new_headless_mode()
        .window_size(1280, 900)
        .arg("--disable-gpu")
        .arg("--disable-dev-shm-usage")
        .build()
        .unwrap();
    let (mut browser, mut handler) = match Browser::launch(config).await {
        Ok(b) => b,
        Err(e) => panic!("chromium is installed but did not start: {e}"),
    };
    let events = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let page = browser.new_page("about:blank").await.unwrap();
    // Every uncaught error or console.error is recorded for the end.
    page.evaluate_on_new_document(
        "window.__errors = []; addEventListener('error', e => __errors.push(String(e.message))); \
         addEventListener('unhandledrejection', e => __errors.push(String(e.reason))); \
         const ce = console.error; console.error = (...a) => { __errors.push(a.join(' ')); ce(...a); };",
    )
    .await
    .unwrap();
    page.goto(format!("http://{addr}/")).await.unwrap();

    // Signed in (this node has no tokens: the page says so) and the sandbox
    // with its supervision tree is there.
    wait_js(
        &page,
        "signed in",
        "!document.querySelector('#app').hidden && document.querySelector('#who').textContent",
        Duration::from_secs(10),
    )
    .await;
    wait_js(
        &page,
        "sandbox listed",
        "document.querySelector('#sandboxes tbody').textContent.includes('shop')",
        Duration::from_secs(5),
    )
    .await;
    wait_js(
        &page,
        "tree shown",
        "document.querySelector('#tree').textContent.includes('counter')",
        Duration::from_secs(5),
    )
    .await;
    wait_js(
        &page,
        "stream connected",
        "document.querySelector('#live').textContent === 'live'",
        Duration::from_secs(5),
    )
    .await;
    shot(&page, "overview").await;

    // A reload made through the API appears without a page reload.
    let (s, v) = api
        .post(
            "/api/v1/sandboxes/shop/reload",
            json!({ "modules": { "counter": counter_v(3) } }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t0 = Instant::now();
    wait_js(
        &page,
        "reload event shown",
        "document.querySelector('#events').textContent.includes('counter v1→v2')",
        Duration::from_secs(1),
    )
    .await;
    eprintln!(
        "reload on the page {:?} after the API answered",
        t0.elapsed()
    );

    // The editor: a syntax error is shown at its line and nothing applied.
    js(&page, "document.querySelector('[data-tab=editor]').click()").await;
    wait_js(&page, "editor source loaded", "document.querySelector('#ed-module').value === 'counter' || (document.querySelector('#ed-module').value = 'counter', document.querySelector('#ed-module').dispatchEvent(new Event('change')), false)", Duration::from_secs(5)).await;
    wait_js(
        &page,
        "source in the editor",
        "document.querySelector('#ed-source').value.includes('handle_call')",
        Duration::from_secs(5),
    )
    .await;
    js(&page, "(() => { const t = document.querySelector('#ed-source'); t.value = 'local counter = {}\\nfunction counter.init(args)\\n  return {{ count = 0 }\\nend\\nreturn counter\\n'; t.dispatchEvent(new Event('input')); })()").await;
    let diag = wait_js(
        &page,
        "diagnostic shown",
        "document.querySelector('#ed-diags').textContent",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        diag.as_str().unwrap().contains("line 3") || diag.as_str().unwrap().contains("line 5"),
        "{diag}"
    );
    wait_js(
        &page,
        "gutter marks the line",
        "document.querySelectorAll('#ed-gutter .err').length === 1",
        Duration::from_secs(2),
    )
    .await;
    shot(&page, "editor-error").await;
    let (_, mods) = api.get("/api/v1/sandboxes/shop/modules").await;
    let version = |mods: &Value| {
        mods.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "counter")
            .unwrap()["version"]
            .clone()
    };
    assert_eq!(version(&mods), 2, "a dry run applies nothing");

    // A valid edit: the dry run says what would migrate; Apply commits.
    let valid = counter_v(10);
    js(&page, &format!("(() => {{ const t = document.querySelector('#ed-source'); t.value = {}; t.dispatchEvent(new Event('input')); }})()", serde_json::to_string(&valid).unwrap())).await;
    wait_js(
        &page,
        "dry run ok",
        "document.querySelector('#ed-status').textContent.includes('would migrate 1 process')",
        Duration::from_secs(5),
    )
    .await;
    js(&page, "document.querySelector('#ed-apply').click()").await;
    wait_js(
        &page,
        "applied",
        "document.querySelector('#ed-status').textContent.startsWith('applied')",
        Duration::from_secs(5),
    )
    .await;
    let (_, mods) = api.get("/api/v1/sandboxes/shop/modules").await;
    assert_eq!(version(&mods), 3, "the API confirms the new version");
    let (_, reply) = api.call("shop", "counter", json!("inc")).await;
    assert_eq!(reply["reply"], 10, "{reply}");

    // Rollback from the page, to v2 (its source becomes current again).
    js(
        &page,
        "document.querySelector('[data-tab=sandbox]').click()",
    )
    .await;
    wait_js(&page, "modules listed", "[...document.querySelectorAll('#modules button')].find(b => b.closest('tr').textContent.includes('counter'))", Duration::from_secs(5)).await;
    js(&page, "[...document.querySelectorAll('#modules button')].find(b => b.closest('tr').textContent.includes('counter')).click()").await;
    wait_js(
        &page,
        "diff shown",
        "document.querySelectorAll('#diff .add').length > 0",
        Duration::from_secs(5),
    )
    .await;
    shot(&page, "modules-diff").await;
    js(&page, "[...document.querySelectorAll('#v-list button')].find(b => b.textContent.includes('v2')).click()").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, mods) = api.get("/api/v1/sandboxes/shop/modules").await;
        if version(&mods) != 3 {
            let (_, vs) = api
                .get("/api/v1/sandboxes/shop/modules/counter/versions")
                .await;
            let current = vs
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["current"] == true)
                .unwrap()
                .clone();
            assert!(
                current["source"]
                    .as_str()
                    .unwrap()
                    .contains("state.count += 3"),
                "rolled back to v2's source"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no rollback: {mods}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    wait_js(
        &page,
        "rollback event shown",
        "document.querySelector('#events').textContent.includes('rollback')",
        Duration::from_secs(2),
    )
    .await;

    // A narrow window still lays out (no horizontal page scroll).
    page.execute(
        chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams::new(
            380, 800, 1.0, true,
        ),
    )
    .await
    .unwrap();
    wait_js(
        &page,
        "narrow layout",
        "document.documentElement.scrollWidth <= window.innerWidth + 1",
        Duration::from_secs(2),
    )
    .await;
    shot(&page, "narrow").await;

    let errors = js(&page, "window.__errors").await;
    assert_eq!(errors, json!([]), "console errors on the page");
    browser.close().await.unwrap();
    let _ = browser.wait().await;
    events.abort();
}
