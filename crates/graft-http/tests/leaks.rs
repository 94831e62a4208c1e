//! A token's secret never leaves the request that carried it (SPEC §9): a
//! node on a real socket, with every log line of the process captured at
//! TRACE level, gets requests carrying valid, revoked and malformed tokens,
//! tokens in the session cookie and in sign-in bodies; no secret may appear
//! in a log line, an answer (but the one that mints a token), the audit log
//! or the bytes of the database files.
//!
//! Its own test binary: the log capture is process-wide.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use graft_http::trust::{RateLimit, Role, Trust, TrustConfig};
use std::io::Read;

/// Every log line of the process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

struct CapturedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = CapturedWriter;
    fn make_writer(&'a self) -> CapturedWriter {
        CapturedWriter(self.0.clone())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One HTTP/1.1 exchange on a fresh connection: the status and the whole
/// answer (headers and body) as text.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let out = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    (status, text)
}

fn bearer(t: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {t}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_secrets_never_reach_logs_answers_the_audit_log_or_the_database() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .init();

    let dir = std::env::temp_dir().join(format!("graft-leaks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = graft::Node::builder()
        .threads(2)
        .data_dir(&dir)
        .open()
        .unwrap();
    let store = node.store().unwrap().clone();
    let config = TrustConfig {
        auth_failures: RateLimit {
            burst: 1_000_000,
            per_second: 1_000_000.0,
        },
        ..TrustConfig::default()
    };
    let trust = Arc::new(Trust::new(store.clone(), config).unwrap());
    let admin = trust.create_token(Role::Admin, None, None).unwrap().secret;
    let revoked = trust.create_token(Role::Operator, None, None).unwrap();
    trust.revoke_token(&revoked.record.id).unwrap();
    let revoked = revoked.secret;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = graft_http::router(node.clone(), trust.clone());
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let counter = r#"local c = {}
function c.init() return { count = 0 } end
function c.handle_call(r, f, s) s.count += 1; return s.count, s end
function c.handle_cast(m, s) return s end
function c.handle_info(m, s) return s end
return c
"#;
    let create =
        serde_json::json!({ "id": "demo", "entry": null, "modules": { "counter": counter } })
            .to_string();
    let mut answers = Vec::new();
    let (s, a) = exchange(
        addr,
        "POST",
        "/api/v1/sandboxes",
        &[bearer(&admin)],
        &create,
    )
    .await;
    assert_eq!(s, 201, "{a}");
    answers.push(a);
    let call = r#"{"to":"c","request":"inc"}"#;
    let spawn = r#"{"module":"counter","name":"c"}"#;
    let (s, a) = exchange(
        addr,
        "POST",
        "/api/v1/sandboxes/demo/spawn",
        &[bearer(&admin)],
        spawn,
    )
    .await;
    assert!((200..300).contains(&s), "{a}");
    answers.push(a);

    // A valid token on audited and unaudited routes, and a minted one.
    for (m, path, body) in [
        ("POST", "/api/v1/sandboxes/demo/call", call),
        ("GET", "/api/v1/sandboxes/demo/processes", ""),
        (
            "POST",
            "/api/v1/sandboxes/demo/eval",
            r#"{"source":"return 1"}"#,
        ),
        ("GET", "/api/v1/sandboxes/demo/processes/c/state", ""),
        ("GET", "/api/v1/no/such/route", ""),
    ] {
        let (s, a) = exchange(addr, m, path, &[bearer(&admin)], body).await;
        assert!(s < 500, "{m} {path}: {a}");
        answers.push(a);
    }
    let (s, minted_answer) = exchange(
        addr,
        "POST",
        "/api/v1/tokens",
        &[bearer(&admin)],
        r#"{"role":"viewer"}"#,
    )
    .await;
    assert_eq!(s, 201, "{minted_answer}");
    let minted = minted_answer
        .split("\"token\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    assert!(minted.starts_with("graft_"));

    // Revoked and malformed tokens, on audited and unaudited routes.
    let upper = admin.to_uppercase();
    let long = format!("{admin}{admin}");
    let cut = admin[..admin.len() - 1].to_owned();
    let refused: Vec<Vec<(&str, String)>> = vec![
        vec![bearer(&revoked)],
        vec![bearer(&format!("{admin}0"))],
        vec![bearer(&upper)],
        vec![bearer(&cut)],
        vec![bearer(&long)],
        vec![("Authorization", format!("Basic {admin}"))],
        vec![("Authorization", admin.clone())],
        vec![bearer(&minted), bearer(&admin)],
        // A token where the session cookie belongs.
        vec![("Cookie", format!("graft_session={admin}"))],
        vec![("Cookie", format!("graft_session={revoked}"))],
    ];
    for headers in &refused {
        for (m, path, body) in [
            ("POST", "/api/v1/sandboxes/demo/call", call),
            ("GET", "/api/v1/sandboxes", ""),
            ("GET", "/api/v1/no/such/route", ""),
        ] {
            let (s, a) = exchange(addr, m, path, headers, body).await;
            assert_eq!(s, 401, "{m} {path} {headers:?}: {a}");
            answers.push(a);
        }
    }
    // Tokens in sign-in bodies: valid (a session follows), revoked, malformed.
    let (s, a) = exchange(
        addr,
        "POST",
        "/api/v1/session",
        &[],
        &serde_json::json!({ "token": admin }).to_string(),
    )
    .await;
    assert!(s < 300, "{a}");
    let cookie = a
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_owned();
    answers.push(a);
    for t in [&revoked, &upper, &long] {
        let (s, a) = exchange(
            addr,
            "POST",
            "/api/v1/session",
            &[],
            &serde_json::json!({ "token": t }).to_string(),
        )
        .await;
        assert_eq!(s, 401, "{a}");
        answers.push(a);
    }
    let (s, a) = exchange(
        addr,
        "POST",
        "/api/v1/sandboxes/demo/call",
        &[("Cookie", cookie.clone())],
        call,
    )
    .await;
    assert_eq!(s, 200, "{a}");
    answers.push(a);

    // The audit log refuses rows: the failures are logged (with the
    // store's error), and must not carry the credentials either.
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER test_audit_fails BEFORE INSERT ON audit \
         BEGIN SELECT RAISE(ABORT, 'the test refuses audit rows'); END;",
    )
    .unwrap();
    for headers in [
        vec![bearer(&admin)],
        vec![bearer(&revoked)],
        vec![bearer(&upper)],
    ] {
        // `eval` is audited whatever the node's settings (an allowed call is
        // not, unless the node audits messages).
        let eval = r#"{"source":"return 1"}"#;
        let (s, a) = exchange(addr, "POST", "/api/v1/sandboxes/demo/eval", &headers, eval).await;
        assert!(s == 503 || s == 401, "{a}");
        answers.push(a);
    }
    let (s, a) = exchange(
        addr,
        "POST",
        "/api/v1/tokens",
        &[bearer(&admin)],
        r#"{"role":"viewer"}"#,
    )
    .await;
    assert!(s >= 500, "{a}");
    answers.push(a);
    conn.execute_batch("DROP TRIGGER test_audit_fails;")
        .unwrap();
    drop(conn);

    let audit = serde_json::to_string(&store.audit(None, 10_000).unwrap()).unwrap();
    assert!(audit.contains("/api/v1/sandboxes/{id}/call"), "{audit}");
    server.abort();
    node.shutdown();
    drop(trust);
    drop(store);
    drop(node);
    let mut db = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            db.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(db.len() > 4096, "the database files were read");
    let db = String::from_utf8_lossy(&db).into_owned();
    let logs = logs.text();
    // The capture saw the server and the refused audit rows.
    assert!(logs.contains("connection"), "{logs}");
    assert!(logs.contains("the test refuses audit rows"), "{logs}");

    for secret in [&admin, &revoked, &minted, &upper] {
        let hex = &secret[secret.len() - 64..];
        for (what, text) in [("logs", &logs), ("audit log", &audit), ("database", &db)] {
            assert!(!text.contains(hex), "a token's secret is in the {what}");
        }
        for a in &answers {
            assert!(!a.contains(hex), "a token's secret is in an answer: {a}");
        }
    }
    // The minted token's answer is the one place its secret appears.
    assert!(minted_answer.contains(&minted));
    let _ = std::fs::remove_dir_all(&dir);
}
