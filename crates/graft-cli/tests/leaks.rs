//! The real binary never prints a token's secret (SPEC §9): `graft serve`
//! with `RUST_LOG=trace` gets requests carrying valid, revoked and
//! malformed tokens (and a token where the session cookie belongs), and a
//! client verb run with a revoked token; no secret appears on the node's
//! stdout or stderr, in the client's output, or in the database files.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

fn exchange(port: u16, method: &str, path: &str, header: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).unwrap().parse().unwrap();
    (status, resp)
}

#[test]
fn no_token_secret_on_the_terminal_or_in_the_database() {
    let home: PathBuf =
        std::env::temp_dir().join(format!("graft-cli-leaks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let mut child = Command::new(env!("CARGO_BIN_EXE_graft"))
        .env_remove("GRAFT_URL")
        .env_remove("GRAFT_TOKEN")
        .env("XDG_DATA_HOME", &home)
        .env("RUST_LOG", "trace")
        .args(["serve", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().unwrap(), out.clone());
    collect(child.stderr.take().unwrap(), err.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (port, token_file) = loop {
        let text = out.lock().unwrap().clone();
        let port = text.split("://127.0.0.1:").nth(1).map(|r| {
            r.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        });
        let file = text.split("admin token: ").nth(1).map(|l| {
            l.split("  (")
                .next()
                .unwrap_or("")
                .trim_end_matches(" (new)")
                .to_owned()
        });
        if let (Some(p), Some(f)) = (port, file) {
            break (p.parse::<u16>().unwrap(), f);
        }
        assert!(
            Instant::now() < deadline,
            "the node did not start:\n{text}\n{}",
            err.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let url = format!("http://127.0.0.1:{port}");
    let graft = |args: &[&str], token: &str| {
        Command::new(env!("CARGO_BIN_EXE_graft"))
            .env_remove("GRAFT_URL")
            .env("XDG_DATA_HOME", &home)
            .env("GRAFT_TOKEN", token)
            .env("RUST_LOG", "trace")
            .args(args)
            .args(["--url", &url])
            .output()
            .unwrap()
    };
    // A token to revoke, through the CLI.
    let made = graft(&["token", "create", "--role", "operator"], &admin);
    assert!(made.status.success(), "{made:?}");
    let stdout = String::from_utf8_lossy(&made.stdout).into_owned();
    let revoked = stdout
        .split_whitespace()
        .find(|w| w.starts_with("graft_"))
        .unwrap()
        .to_owned();
    let listed = graft(&["token", "list"], &admin);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let id = listed
        .lines()
        .find(|l| l.contains("operator"))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("tok_")))
        .unwrap_or_else(|| panic!("{listed}"))
        .to_owned();
    assert!(graft(&["token", "revoke", &id], &admin).status.success());

    let mut seen = String::new();
    let body = r#"{"id":"demo","modules":{"m":"return {}"},"entry":null}"#;
    let (s, a) = exchange(
        port,
        "POST",
        "/api/v1/sandboxes",
        &format!("Authorization: Bearer {admin}"),
        body,
    );
    assert_eq!(s, 201, "{a}");
    seen.push_str(&a);
    let upper = admin.to_uppercase();
    for header in [
        format!("Authorization: Bearer {revoked}"),
        format!("Authorization: Bearer {admin}0"),
        format!("Authorization: Bearer {upper}"),
        format!("Authorization: {admin}"),
        format!("Cookie: graft_session={admin}"),
    ] {
        for (m, path, body) in [
            ("DELETE", "/api/v1/sandboxes/demo", ""),
            ("GET", "/api/v1/sandboxes", ""),
            ("GET", "/api/v1/nothing/here", ""),
        ] {
            let (s, a) = exchange(port, m, path, &header, body);
            assert_eq!(s, 401, "{m} {path}: {a}");
            seen.push_str(&a);
        }
    }
    let (s, a) = exchange(
        port,
        "POST",
        "/api/v1/session",
        "X-Nothing: 1",
        &format!("{{\"token\":\"{revoked}\"}}"),
    );
    assert_eq!(s, 401, "{a}");
    seen.push_str(&a);
    // A client verb with the revoked token: refused, and says so without it.
    let refused = graft(&["ps", "demo"], &revoked);
    assert!(!refused.status.success());
    seen.push_str(&String::from_utf8_lossy(&refused.stdout));
    seen.push_str(&String::from_utf8_lossy(&refused.stderr));

    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let node_out = format!("{}\n{}", out.lock().unwrap(), err.lock().unwrap());
    assert!(
        node_out.contains("TRACE") || node_out.contains("DEBUG"),
        "RUST_LOG=trace reached the node: {node_out}"
    );
    let mut db = Vec::new();
    for entry in std::fs::read_dir(home.join("graft")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && !path.ends_with("admin.token") {
            db.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(db.len() > 4096, "the database files were read");
    let db = String::from_utf8_lossy(&db).into_owned();
    for secret in [&admin, &revoked, &upper] {
        let hex = &secret[secret.len() - 64..];
        assert!(!node_out.contains(hex), "a secret on the node's output");
        assert!(
            !seen.contains(hex),
            "a secret in an answer or the client's output"
        );
        assert!(!db.contains(hex), "a secret in the database files");
    }
    let _ = std::fs::remove_dir_all(&home);
}
