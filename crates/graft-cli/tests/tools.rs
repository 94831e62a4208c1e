//! End-to-end tests of the guest developer's tools (SPEC §11): `graft test`
//! on the fixture projects under `tests/fixtures/`, and `graft check` on
//! projects with each kind of error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn graft() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.env_remove("GRAFT_URL").env_remove("RUST_LOG");
    cmd
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(args: &[&str]) -> Output {
    graft().args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-tools-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `failing` fixture with short time limits (its loops must time out).
fn failing(extra: &[&str]) -> Output {
    let dir = fixture("failing");
    let mut args = vec![
        "test",
        dir.to_str().unwrap(),
        "--timeout-ms",
        "1500",
        "--jobs",
        "4",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn a_passing_suite_exits_0_and_its_minute_timers_run_on_the_test_clock() {
    // Each test may take 5 s of real time; the clock tests wait for 60 s
    // and 11-minute timers, so they pass only on the test clock.
    let dir = fixture("passing");
    let out = run(&["test", dir.to_str().unwrap(), "--timeout-ms", "5000"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("running 7 tests"), "{stdout}");
    for name in [
        "test/clock_test.luau::a_minute_timer_fires_when_the_clock_reaches_it ... ok",
        "test/clock_test.luau::graft_now_follows_the_test_clock ... ok",
        "test/clock_test.luau::a_canary_window_closes_when_the_clock_passes_it ... ok",
        "test/reload_test.luau::code_change_migrates_up_and_down ... ok",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
    assert!(stdout.contains("7 passed, 0 failed"), "{stdout}");
}

#[test]
fn failures_name_file_and_line_and_the_run_survives_loops_memory_and_deadlocks() {
    let out = failing(&[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let expect = [
        // assertions: the frame, then expected and actual
        "test/assertions_test.luau:8: eq_fails: eq: ping echoes\n  expected: 3\n    actual: 2",
        "test/assertions_test.luau:12: deep_eq_fails: deep_eq",
        "        .a: expected 2, got 1\n        .list[2]: unexpected 2",
        "test/assertions_test.luau:16: ok_fails: ok: never true",
        "test/assertions_test.luau:20: raises_fails: raises",
        "test/assertions_test.luau:24: matches_fails: matches",
        "test/assertions_test.luau:29: errors: test/assertions_test.luau:29: attempt to index nil",
        // a process of the sandbox that loops crashes on handler_ms
        "sandbox_process_times_out: t.call(\"ping\"): `<ping.2>` exited before replying: timeout",
        // the driver that loops, even inside pcall, or waits forever
        "test/hostile_test.luau::loops_forever ... FAILED (timeout)",
        "test/hostile_test.luau::loops_inside_pcall ... FAILED (timeout)",
        "test/hostile_test.luau::never_returns ... FAILED (timeout)",
        "test/hostile_test.luau:4: loops_forever: timeout",
        "test/hostile_test.luau::blows_memory ... FAILED (out_of_memory)",
        // hostile files
        "not_a_function: is an integer, not a test function",
        "test/not_a_table_test.luau: <load>: a test file returns a table of test functions, but this one returned 42",
        "test/load_error_test.luau:1: <load>: test/load_error_test.luau:1: broken at load",
        "test/syntax_error_test.luau:3: <load>: syntax error",
        "test/assertions_test.luau::passes ... ok",
    ];
    for e in expect {
        assert!(stdout.contains(e), "missing {e:?} in:\n{stdout}");
    }
    assert!(
        stdout
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("1 passed, 15 failed"),
        "{stdout}"
    );
}

#[test]
fn filter_selects_tests_by_file_and_name() {
    let out = failing(&["--filter", "assertions_test.luau::passes"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("running 1 test\n"), "{stdout}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");

    let out = failing(&["--filter", "eq_fails"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("0 passed, 2 failed"), "{stdout}");

    let out = failing(&["--filter", "no such test"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("0 passed, 0 failed"));
}

#[test]
fn json_and_junit_reports_hold_every_outcome() {
    let dir = temp_dir("junit");
    let junit = dir.join("report.xml");
    let out = failing(&["--json", "--junit", junit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], 1);
    assert_eq!(report["failed"], 15);
    let tests = report["tests"].as_array().unwrap();
    let eq = tests.iter().find(|t| t["name"] == "eq_fails").unwrap();
    assert_eq!(eq["kind"], "assertion");
    assert_eq!(eq["location"], "test/assertions_test.luau:8");
    assert_eq!(eq["expected"], "3");
    assert_eq!(eq["actual"], "2");
    let oom = tests.iter().find(|t| t["name"] == "blows_memory").unwrap();
    assert_eq!(oom["kind"], "out_of_memory");

    let xml = std::fs::read_to_string(&junit).unwrap();
    well_formed(&xml);
    assert!(xml.contains("<testsuites name=\"graft test\" tests=\"16\" failures=\"15\""));
    assert!(
        xml.contains("<testsuite name=\"test/assertions_test.luau\" tests=\"8\" failures=\"7\"")
    );
    assert!(xml.contains("<failure type=\"timeout\""));
    assert!(xml.contains("name=\"&lt;load&gt;\""), "names are escaped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small XML well-formedness check: one root, tags balanced and nested,
/// attributes quoted, only the five predefined entities, no raw `<` or `&`
/// in text, no control characters XML 1.0 forbids.
fn well_formed(xml: &str) {
    let body = xml
        .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n")
        .expect("XML declaration");
    for c in body.chars() {
        assert!(
            c >= ' ' || matches!(c, '\t' | '\n' | '\r'),
            "control character {c:?}"
        );
    }
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = body;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('<') {
            let end = after.find('>').expect("unclosed tag");
            let tag = &after[..end];
            rest = &after[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name = tag.split_whitespace().next().expect("tag name");
            let mut attrs = &tag[name.len()..];
            loop {
                attrs = attrs.trim_start();
                if attrs.is_empty() {
                    break;
                }
                let eq = attrs.find("=\"").expect("attribute without a quoted value");
                let value_and_rest = &attrs[eq + 2..];
                let close = value_and_rest.find('"').expect("unterminated attribute");
                entities_ok(&value_and_rest[..close]);
                attrs = &value_and_rest[close + 1..];
            }
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name.to_string());
            }
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            let chunk = &rest[..end];
            if stack.is_empty() {
                assert!(chunk.trim().is_empty(), "text outside the root: {chunk:?}");
            }
            entities_ok(chunk);
            rest = &rest[end..];
        }
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
    assert_eq!(roots, 1, "one root element");
}

fn entities_ok(s: &str) {
    assert!(!s.contains('<'), "raw < in {s:?}");
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        let after = &rest[at..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| after.starts_with(e)),
            "bad entity in {s:?}"
        );
        rest = &after[1..];
    }
}

#[test]
fn hundreds_of_tests_each_get_a_sandbox() {
    let dir = fixture("many");
    let out = run(&["test", dir.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("500 passed, 0 failed"), "{stdout}");
}

#[test]
fn the_scaffold_tests_pass_and_check() {
    let dir = temp_dir("scaffold").join("app");
    assert!(run(&["new", dir.to_str().unwrap()]).status.success());
    let out = run(&["test", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("5 passed, 0 failed"));
    let out = run(&["check", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "✓ 2 modules checked: app, counter"
    );
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

#[test]
fn test_refuses_a_project_that_does_not_load() {
    let dir = project("test-broken", &[("src/app.luau", "return {")]);
    let out = run(&["test", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("src/app.luau:1"), "{stderr}");
    assert!(stderr.contains("no test ran"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A project in a temp dir: graft.toml (entry `app`) plus `files`.
fn project(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::write(
        dir.join("graft.toml"),
        "[sandbox]\nid = \"checked\"\nentry = \"app\"\n",
    )
    .unwrap();
    for (path, source) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, source).unwrap();
    }
    dir
}

const APP: &str = "return { behaviour = \"supervisor\", init = function() return { strategy = \"one_for_one\", children = {} } end }";

/// `graft check` on a project: (exit code, stderr, JSON report).
fn check(name: &str, files: &[(&str, &str)]) -> (Option<i32>, String, Value) {
    let dir = project(name, files);
    let out = run(&["check", dir.to_str().unwrap()]);
    let json = run(&["check", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), json.status.code());
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), text(&out.stderr), report)
}

#[test]
fn check_passes_a_clean_project() {
    let (code, stderr, report) = check(
        "check-ok",
        &[
            ("src/app.luau", APP),
            (
                "src/lib/util.luau",
                "return { double = function(x) return 2 * x end }",
            ),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["modules"], serde_json::json!(["app", "lib.util"]));
}

#[test]
fn check_reports_each_kind_of_error_like_run() {
    // syntax: file:line:col with a code frame
    let (code, stderr, report) = check(
        "check-syntax",
        &[
            ("src/app.luau", APP),
            ("src/bad.luau", "local x = = 1\nreturn {}"),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("src/bad.luau:1:"), "{stderr}");
    assert!(stderr.contains("local x = = 1"), "code frame: {stderr}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["kind"], "compile_error");

    // require cycle
    let (code, stderr, report) = check(
        "check-cycle",
        &[
            ("src/app.luau", APP),
            ("src/a.luau", "local b = require(\"b\")\nreturn {}"),
            ("src/b.luau", "local a = require(\"a\")\nreturn {}"),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("require cycle: a -> b -> a"), "{stderr}");
    assert_eq!(report["error"]["diagnostics"][0]["kind"], "cycle");

    // a missing module
    let (code, stderr, _) = check(
        "check-missing",
        &[
            ("src/app.luau", APP),
            ("src/a.luau", "local b = require(\"nowhere\")\nreturn {}"),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no module `nowhere`"), "{stderr}");

    // behaviour callbacks of the wrong type
    let (code, stderr, report) = check(
        "check-behaviour",
        &[
            ("src/app.luau", APP),
            (
                "src/srv.luau",
                "return { init = function() return {} end, handle_call = 5 }",
            ),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("`srv.handle_call` must be a function, not a"),
        "{stderr}"
    );
    assert_eq!(report["error"]["kind"], "reload_aborted");

    // a capability that graft.toml does not grant
    let (code, stderr, report) = check(
        "check-ungranted",
        &[
            ("src/app.luau", APP),
            (
                "src/r.luau",
                "return { roll = function() return random.int(1, 6) end }",
            ),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("src/r.luau:1:"), "{stderr}");
    assert!(stderr.contains("random"), "{stderr}");
    assert_eq!(
        report["error"]["diagnostics"][0]["kind"],
        "ungranted_global"
    );

    // the entry module is missing
    let (code, stderr, _) = check("check-entry", &[("src/other.luau", "return {}")]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("entry module `app`"), "{stderr}");

    // graft.toml itself is wrong
    let dir = temp_dir("check-toml");
    std::fs::write(dir.join("graft.toml"), "[sandbox]\nid = \"x\"\nbogus = 1\n").unwrap();
    let out = run(&["check", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("bogus"), "{}", text(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);

    // not a project
    let dir = temp_dir("check-none");
    let out = run(&["check", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a Graft project"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// CI runs the bundled examples' suites through `graft test` here (the
/// README's test command is `cargo test --workspace`).
#[test]
fn the_bundled_examples_pass_their_suites() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for (name, count) in [("counter", 5), ("chat", 3), ("ratelimit", 6)] {
        let dir = examples.join(name);
        let junit = temp_dir(&format!("example-{name}")).join("junit.xml");
        let out = run(&[
            "test",
            dir.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{name}:\n{stdout}");
        assert!(
            stdout.contains(&format!("{count} passed, 0 failed")),
            "{name}:\n{stdout}"
        );
        well_formed(&std::fs::read_to_string(&junit).unwrap());
        let _ = std::fs::remove_dir_all(junit.parent().unwrap());
        let out = run(&["check", dir.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
}

#[test]
fn coverage_counts_the_statement_lines_each_module_ran() {
    let dir = fixture("passing");
    let out = run(&["test", dir.to_str().unwrap(), "--coverage", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let store = report["coverage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["module"] == "store")
        .unwrap()
        .clone();
    // src/store.luau: 14 lines hold a statement; only the fallback
    // `return nil, state` (line 15) is never run by the suite. Versions
    // a test reloads (store_v2) are other text and do not count.
    assert_eq!(store["file"], "src/store.luau");
    assert_eq!(store["lines"], 14);
    assert_eq!(store["covered"], 13);
    assert_eq!(store["missed"], serde_json::json!([15]));
    assert!(store["hits"]["10"].as_u64().unwrap() >= 3, "{store}");

    let out = run(&["test", dir.to_str().unwrap(), "--coverage"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("src/store.luau      13/14      92.9%"),
        "{stdout}"
    );
    assert!(
        stdout
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("7 passed, 0 failed"),
        "the summary stays the closing line: {stdout}"
    );
}

/// The definitions golden test: `graft types` prints exactly the checked-in
/// file. Changing `graft::vm::GRAFT_API` or the test library's `TEST_API`
/// means regenerating it (`graft types --stdout > tests/fixtures/graft.d.luau`)
/// and reviewing the diff; the VM refuses to start when `GRAFT_API` and
/// the prelude disagree, so the file matches what guests get.
#[test]
fn types_match_the_golden_definitions_and_scaffold_the_editor() {
    let golden = std::fs::read_to_string(fixture("graft.d.luau")).unwrap();
    let out = run(&["types", "--stdout"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), golden);

    let dir = temp_dir("types");
    let out = run(&["types", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.join("graft.d.luau")).unwrap(),
        golden
    );
    let out = run(&["types", dir.join("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a directory"));

    let project = dir.join("app");
    assert!(run(&["new", project.to_str().unwrap()]).status.success());
    assert_eq!(
        std::fs::read_to_string(project.join("graft.d.luau")).unwrap(),
        golden
    );
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(project.join(".vscode/settings.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        settings["luau-lsp.types.definitionFiles"],
        serde_json::json!(["graft.d.luau"])
    );
    let luaurc: Value =
        serde_json::from_str(&std::fs::read_to_string(project.join(".luaurc")).unwrap()).unwrap();
    assert_eq!(luaurc["languageMode"], "nonstrict");
    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    assert!(readme.contains("graft types"), "{readme}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
}

const STORE_APP: &str = "return { behaviour = \"supervisor\", init = function() return { strategy = \"one_for_one\", children = { { id = \"store\", module = \"store\", args = { items = { \"a\", \"b\" } }, name = \"store\" } } } end }";

/// A store whose version 1 undoes version 2's `count` on a rollback
/// (`reversible`) or forgets to.
fn store_v1(reversible: bool) -> String {
    format!(
        "local m = {{}}\nfunction m.init(args) return {{ items = args.items }} end\nfunction m.handle_call(r, f, s) return #s.items, s end\nfunction m.code_change(old, s, extra)\n  if type(old) == \"table\" then {} end\n  return s\nend\nreturn m\n",
        if reversible { "s.count = nil" } else { "" }
    )
}

const STORE_V2: &str = "local m = {}\nfunction m.init(args) return { items = args.items, count = #args.items } end\nfunction m.handle_call(r, f, s) return s.count, s end\nfunction m.code_change(old, s, extra)\n  s.count = #s.items\n  return s\nend\nreturn m\n";

#[test]
fn migration_checks_catch_a_code_change_that_does_not_round_trip() {
    for reversible in [false, true] {
        let dir = project(
            if reversible { "mig-ok" } else { "mig-bad" },
            &[
                ("src/app.luau", STORE_APP),
                ("src/store.luau", &store_v1(reversible)),
            ],
        );
        git(&dir, &["init", "-q"]);
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-qm", "v1"]);
        std::fs::write(dir.join("src/store.luau"), STORE_V2).unwrap();
        let out = run(&["test", "--migrations", dir.to_str().unwrap()]);
        let stdout = text(&out.stdout);
        if reversible {
            assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
            assert!(
                stdout.contains("round-trip (HEAD → working tree → HEAD; 0 recorded, 1 from the app, 0 from init, 100 generated)"),
                "{stdout}"
            );
        } else {
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            assert!(
                stdout.contains("states fail (HEAD → working tree → HEAD;"),
                "{stdout}"
            );
            assert!(stdout.contains("first: app process"), "{stdout}");
            // Shrunk from `{ items = { "a", "b" } }`: no element is needed
            // to show that `count` survives the rollback; dropping `items`
            // fails another way (the up migration raises), so it stays.
            assert!(stdout.contains("smallest found"), "{stdout}");
            assert!(
                stdout.contains("down:   {\"count\":0,\"items\":"),
                "{stdout}"
            );
            assert!(!stdout.contains("\"a\""), "shrunk: {stdout}");
        }
        // Same seed, same generated states, same report.
        let args = [
            "test",
            "--migrations",
            dir.to_str().unwrap(),
            "--json",
            "--cases",
            "7",
            "--seed",
            "42",
        ];
        let a: Value = serde_json::from_slice(&run(&args).stdout).unwrap();
        let b: Value = serde_json::from_slice(&run(&args).stdout).unwrap();
        assert_eq!(a, b);
        assert_eq!(a["seed"], 42);
        assert!(
            a["modules"][0]["report"]
                .to_string()
                .contains("7 generated"),
            "{a}"
        );
        // Committed: the previous version is the commit before the last
        // change of the file.
        git(&dir, &["commit", "-qam", "v2"]);
        let out = run(&["test", "--migrations", dir.to_str().unwrap(), "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["checked"], 1);
        assert_eq!(report["failed"], if reversible { 0 } else { 1 });
        // An up migration that fails is reported, not a crash.
        std::fs::write(
            dir.join("src/store.luau"),
            STORE_V2.replace("s.count = #s.items", "error(\"no way up\")"),
        )
        .unwrap();
        let out = run(&["test", "--migrations", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stdout).contains("migrating up (HEAD → working tree) failed"),
            "{}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stdout).contains("no way up"),
            "{}",
            text(&out.stdout)
        );
        // A change outside `code_change` (a comment in it, another
        // callback) is not a migration change: the module is skipped.
        git(&dir, &["checkout", "-q", "--", "src/store.luau"]);
        let edited = STORE_V2
            .replace("return s.count, s", "return s.count + 0, s")
            .replace("  s.count = #s.items", "  -- recount\n  s.count = #s.items");
        std::fs::write(dir.join("src/store.luau"), edited).unwrap();
        let out = run(&["test", "--migrations", dir.to_str().unwrap(), "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(out.status.success(), "{report}");
        assert_eq!(report["checked"], 0, "{report}");
        assert_eq!(report["code_change_unchanged"], 1, "{report}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

const COUNTER_APP: &str = "return { behaviour = \"supervisor\", init = function() return { strategy = \"one_for_one\", children = { { id = \"c\", module = \"counter\", name = \"c\" } } } end }";

/// Counter versions: 1 and 2 are kept by the node, 3 is the working tree.
/// 3 adds `double`; 2 does not remove it on a rollback.
fn counter(v: u32) -> String {
    let migrate = match v {
        1 => "return s",
        2 => "s.v = 2\n  return s",
        _ => "s.double = s.n * 2\n  return s",
    };
    format!(
        "local c = {{}}\nfunction c.init(args) return {{ n = 0, v = {v} }} end\nfunction c.handle_call(r, f, s) s.n += 1; return s.n, s end\nfunction c.code_change(old, s, extra)\n  {migrate}\nend\nreturn c\n"
    )
}

#[test]
fn migration_checks_use_the_running_nodes_kept_versions_and_checkpoints() {
    let dir = project(
        "mig-node",
        &[
            ("src/app.luau", COUNTER_APP),
            ("src/counter.luau", &counter(1)),
        ],
    );
    // Git knows only version 1: the node's kept versions must win.
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "v1"]);
    let node = graft::Node::builder()
        .threads(1)
        .checkpoint_ms(0)
        .data_dir(dir.join(".graft"))
        .open()
        .unwrap();
    let sb = graft::block_on(
        node.create_sandbox(
            graft::SandboxSpec::new("checked")
                .entry(Some("app"))
                .module("app", COUNTER_APP)
                .module("counter", counter(1)),
        ),
    )
    .unwrap();
    graft::block_on(sb.wait_app_started()).unwrap();
    let v2 = std::iter::once(("counter".to_string(), counter(2))).collect();
    graft::block_on(sb.reload(v2, graft::ReloadOptions::default())).unwrap();
    for _ in 0..5 {
        graft::block_on(sb.call("c", serde_json::json!("inc"), None)).unwrap();
    }
    assert_eq!(node.checkpoint().unwrap().written, 1);
    std::fs::write(dir.join("src/counter.luau"), counter(3)).unwrap();

    // The node is still running and holds its lock.
    assert!(dir.join(".graft/graft.lock").exists());
    let out = run(&[
        "test",
        "--migrations",
        dir.to_str().unwrap(),
        "--cases",
        "20",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("(node v2 → working tree → node v2; 1 recorded, 1 from the app, 1 from init, 20 generated)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("first: checkpoint `c` (node v2)"),
        "{stdout}"
    );
    assert!(stdout.contains("\"double\":0"), "shrunk to n = 0: {stdout}");
    // The node is unharmed: it still answers and reloads.
    assert_eq!(
        graft::block_on(sb.call("c", serde_json::json!("inc"), None)).unwrap(),
        6
    );
    node.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migration_checks_survive_a_damaged_node_database_and_refuse_bad_flags() {
    let dir = project(
        "mig-hostile",
        &[
            ("src/app.luau", STORE_APP),
            ("src/store.luau", &store_v1(true)),
        ],
    );
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "v1"]);
    std::fs::write(dir.join("src/store.luau"), STORE_V2).unwrap();
    let db = dir.join(".graft/graft.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let garbage = "not a database at all ".repeat(300);
    std::fs::write(&db, &garbage).unwrap();
    let out = run(&[
        "test",
        "--migrations",
        dir.to_str().unwrap(),
        "--cases",
        "5",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("note: cannot read the node's data"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "(HEAD → working tree → HEAD; 0 recorded, 1 from the app, 0 from init, 5 generated)"
        ),
        "git decides when the node's data cannot be read: {stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&db).unwrap(),
        garbage,
        "the damaged file is left as it was"
    );
    // Bounds and misuse of the flags are refused by the parser (exit 2).
    let d = dir.to_str().unwrap();
    for args in [
        vec!["test", "--migrations", d, "--cases", "10001"],
        vec!["test", "--migrations", d, "--cases", "-1"],
        vec!["test", "--migrations", d, "--seed", "x"],
        vec!["test", d, "--seed", "3"],
        vec!["test", d, "--cases", "3"],
    ] {
        let out = run(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
