//! Hostile inputs for the guest developer's tools (SPEC §11), from the
//! review of issue 15: test files and names built to break the runner and
//! its reports, report paths that cannot be written, projects that
//! `graft check` must refuse cleanly, and `code_change` functions that
//! loop, raise or return what no state can hold. Every case must end with
//! a clear message, a bounded output and the documented exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn graft() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.env_remove("GRAFT_URL").env_remove("RUST_LOG");
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(args: &[&str]) -> Output {
    graft().args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const APP: &str = "return { behaviour = \"supervisor\", init = function() return { strategy = \"one_for_one\", children = {} } end }";

/// A project in a temp dir: graft.toml (entry `app`, the empty supervisor
/// unless `files` has one) plus `files`.
fn project(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::write(
        dir.join("graft.toml"),
        "[sandbox]\nid = \"hostile\"\nentry = \"app\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/app.luau"), APP).unwrap();
    for (path, source) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, source).unwrap();
    }
    dir
}

/// Strict XML 1.0 well-formedness for what the JUnit writer emits: the
/// declaration, one root, balanced tags with valid names, quoted and
/// unique attributes, only the predefined entities, and only characters
/// of XML's `Char` production (no C0 controls but tab/CR/LF, no U+FFFE /
/// U+FFFF, no surrogates).
fn strict_xml(xml: &str) {
    let body = xml
        .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n")
        .expect("XML declaration");
    for c in xml.chars() {
        let ok = matches!(c, '\t' | '\n' | '\r')
            || ('\u{20}'..='\u{d7ff}').contains(&c)
            || ('\u{e000}'..='\u{fffd}').contains(&c)
            || c >= '\u{10000}';
        assert!(ok, "character {c:?} is not allowed in XML 1.0");
    }
    let name_ok = |n: &str| {
        let mut cs = n.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '.' | '-'))
    };
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = body;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('<') {
            assert!(
                !after.starts_with("!") && !after.starts_with('?'),
                "no CDATA, comments or PIs are written: {after:.40}"
            );
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
            assert!(name_ok(name), "bad element name {name:?}");
            let mut attrs = &tag[name.len()..];
            let mut seen = Vec::new();
            loop {
                let trimmed = attrs.trim_start();
                if trimmed.is_empty() {
                    break;
                }
                assert!(
                    trimmed.len() < attrs.len(),
                    "attributes need white space before them: {tag:.80}"
                );
                let eq = trimmed
                    .find("=\"")
                    .expect("attribute without a quoted value");
                let attr = &trimmed[..eq];
                assert!(name_ok(attr), "bad attribute name {attr:?}");
                assert!(!seen.contains(&attr), "duplicate attribute {attr}");
                seen.push(attr);
                let value_and_rest = &trimmed[eq + 2..];
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
            assert!(!chunk.contains("]]>"), "`]]>` in text: {chunk:?}");
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

/// `--junit` is checked before the run: a directory, a missing folder or a
/// dangling link is refused at once (no test runs); a link to a file is
/// followed; the file is written whole (no temporary file left beside it).
#[test]
fn junit_paths_are_checked_before_the_run_and_written_whole() {
    let dir = project(
        "junit-paths",
        &[(
            "test/one_test.luau",
            b"return { ok = function(t) t.ok(true) end }",
        )],
    );
    let d = dir.to_str().unwrap();
    let refused = |junit: &Path, why: &str| {
        let out = run(&["test", d, "--junit", junit.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        assert!(
            !text(&out.stdout).contains("running"),
            "refused before the run: {}",
            text(&out.stdout)
        );
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
    };
    refused(&dir, "is a directory; give a file path");
    refused(
        &dir.join("no/such/folder/r.xml"),
        "does not exist; create it first",
    );
    let dangling = dir.join("dangling.xml");
    std::os::unix::fs::symlink(dir.join("nowhere/x.xml"), &dangling).unwrap();
    refused(&dangling, "a symbolic link that leads nowhere");
    let looping = dir.join("loop.xml");
    std::os::unix::fs::symlink(&looping, &looping).unwrap();
    refused(&looping, "a symbolic link that leads nowhere");

    let real = dir.join("reports/real.xml");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, "old").unwrap();
    let link = dir.join("link.xml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = run(&["test", d, "--junit", link.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let xml = std::fs::read_to_string(&real).unwrap();
    strict_xml(&xml);
    assert!(xml.contains("tests=\"1\" failures=\"0\""), "{xml}");
    let leftovers: Vec<_> = std::fs::read_dir(real.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("real.xml")]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `graft types` replaces an existing file whole, and refuses a
/// `graft.d.luau` that is a directory with a clear message.
#[test]
fn types_overwrites_whole_files_and_refuses_directories() {
    let dir = temp_dir("types-over");
    let file = dir.join("graft.d.luau");
    std::fs::write(&file, "-- stale, edited by hand\n".repeat(10_000)).unwrap();
    let out = run(&["types", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        written.starts_with("-- Luau type definitions"),
        "{written:.80}"
    );
    assert!(!written.contains("stale"));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );

    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let out = run(&["types", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is a directory"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `graft check` on each broken project: exit 1, a message naming the
/// problem, and with `--json` exactly one JSON document on stdout (before
/// the review, a directory without graft.toml printed no JSON at all).
#[test]
fn check_refuses_broken_projects_with_valid_json_each_time() {
    let big: Vec<u8> = std::iter::repeat_n(b"local x = 1\n".as_slice(), 900_000)
        .flatten()
        .copied()
        .collect();
    // (case, the source of `src/m.luau`, what the error says)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "self",
            b"local m = require(\"m\")\nreturn m".to_vec(),
            "require cycle: m -> m",
        ),
        (
            "eof",
            b"local function f()\n  return 1\n".to_vec(),
            "m.luau:3:1",
        ),
        (
            "utf8",
            b"return { s = \"\xff\xfe\" }\n".to_vec(),
            "valid UTF-8",
        ),
        ("empty", Vec::new(), "module `m` returned a nil"),
        ("big", big, "limits.max_source_bytes"),
        (
            "missing",
            b"return require(\"gone\")".to_vec(),
            "no module `gone`",
        ),
    ];
    for (name, source, expect) in cases {
        let dir = project(&format!("check-{name}"), &[("src/m.luau", &source)]);
        let out = run(&["check", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(
            text(&out.stderr).contains(expect),
            "{name}: {}",
            text(&out.stderr)
        );
        let out = run(&["check", dir.to_str().unwrap(), "--json"]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {}", text(&out.stdout)));
        assert_eq!(report["ok"], false, "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Symbolic-link loops under src/ are not followed: the project checks.
    let dir = project("check-links", &[]);
    std::os::unix::fs::symlink("..", dir.join("src/up")).unwrap();
    std::os::unix::fs::symlink("self", dir.join("src/self")).unwrap();
    let out = run(&["check", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["modules"], serde_json::json!(["app"]));
    let _ = std::fs::remove_dir_all(&dir);

    // graft.toml malformed, empty, or missing.
    for (name, toml, expect) in [
        ("toml-bad", Some("[sandbox"), "TOML parse error"),
        ("toml-empty", Some(""), "missing field `sandbox`"),
        ("toml-none", None, "not a Graft project"),
    ] {
        let dir = temp_dir(name);
        if let Some(t) = toml {
            std::fs::write(dir.join("graft.toml"), t).unwrap();
        }
        let out = run(&["check", dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(
            text(&out.stderr).contains(expect),
            "{name}: {}",
            text(&out.stderr)
        );
        let out = run(&["check", dir.to_str().unwrap(), "--json"]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {}", text(&out.stdout)));
        assert_eq!(report["ok"], false);
        assert!(
            report["error"]["message"]
                .as_str()
                .unwrap()
                .contains(expect),
            "{report}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

const HOSTILE_NAMES: &str = r#"local tests = {}
tests["\27[2J\27[31mclear"] = function(t) error("\27]0;title\7 osc") end
tests["new\nline"] = function(t) t.fail("x]]>y<z&\u{fffe}\u{ffff}\1\0") end
tests["cdata ]]> </testcase><evil/>"] = function(t) t.fail("]]>") end
tests["nul\0byte"] = function(t) end
tests["\xff\xfe not utf8"] = function(t) t.ok(true) end
tests[string.rep("long", 10000)] = function(t) end
tests["forges"] = function(t) error("boom\ntest result: ok. 99 passed, 0 failed; finished in 0.00s\ntest x ... ok", 0) end
tests[1] = function(t) end
tests.not_a_function = true
return tests
"#;

const HOSTILE_ERRORS: &str = r#"local tests = {}
function tests.error_table(t) error({ code = 1 }) end
function tests.error_nil(t) error(nil) end
function tests.error_function(t) error(function() end) end
function tests.tostring_loops(t)
	error(setmetatable({}, { __tostring = function() while true do end end }))
end
function tests.tostring_raises(t)
	error(setmetatable({}, { __tostring = function() error("inner") end }))
end
function tests.error_huge(t) error(string.rep("x", 5000000)) end
function tests.yields(t) coroutine.yield() end
function tests.yields_forever(t)
	local co = coroutine.wrap(function() while true do coroutine.yield() end end)
	while true do co() end
end
function tests.cycles(t)
	local a = {}; a.self = a; a.x = 1
	local b = {}; b.self = b; b.x = 2
	t.deep_eq(a, b)
end
function tests.huge_diff(t)
	local a, b = {}, {}
	for i = 1, 50000 do a["k" .. i] = string.rep("a", 100); b["k" .. i] = string.rep("b", 100) end
	t.deep_eq(a, b)
end
return tests
"#;

/// Names and errors built to break the runner: every test gets exactly one
/// outcome with a bounded message, the terminal output carries no raw
/// control character and no forged runner line, the JSON report parses and
/// the JUnit XML is well-formed under a strict reading of XML 1.0. A name
/// that is not UTF-8 runs (before the review it was shown lossily, looked
/// up by the lossy text, and failed with "error converting Lua nil to
/// function"). Huge and deeply nested test files fail to load, alone.
#[test]
fn hostile_names_and_error_values_keep_reports_valid_and_bounded() {
    let deep = format!("return {}{}", "{".repeat(100_000), "}".repeat(100_000));
    let huge = format!("{}return {{}}", "-- x\n".repeat(600_000));
    let dir = project(
        "runner",
        &[
            ("test/names_test.luau", HOSTILE_NAMES.as_bytes()),
            ("test/errors_test.luau", HOSTILE_ERRORS.as_bytes()),
            ("test/five_test.luau", b"return 5"),
            ("test/empty_test.luau", b""),
            ("test/deep_test.luau", deep.as_bytes()),
            ("test/huge_test.luau", huge.as_bytes()),
        ],
    );
    let d = dir.to_str().unwrap();
    let junit = dir.join("junit.xml");
    let out = run(&[
        "test",
        d,
        "--timeout-ms",
        "2000",
        "--junit",
        junit.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for c in stdout.chars() {
        assert!(
            !c.is_control() || c == '\n',
            "raw {c:?} in the terminal output"
        );
    }
    for line in stdout.lines() {
        assert!(
            line.len() < 20_000,
            "unbounded line of {} bytes",
            line.len()
        );
        assert!(
            !line.starts_with("test x ") && !line.starts_with("test result: ok"),
            "forged line {line:?}"
        );
    }
    for expect in [
        "test test/names_test.luau::\u{fffd}\u{fffd} not utf8 ... ok",
        "test test/names_test.luau::nul\\u{0}byte ... ok",
        "test test/names_test.luau::\\u{1b}[2J\\u{1b}[31mclear ... FAILED (error)",
        "test test/names_test.luau::new\\u{a}line ... FAILED (assertion)",
        "not_a_function: is a boolean, not a test function",
        "[1]: test names must be strings",
        "test/five_test.luau: <load>: a test file returns a table of test functions, but this one returned 5",
        "test/empty_test.luau: <load>: a test file returns a table of test functions, but this one returned nil",
        "error_table: table: 0x",
        "error_nil: nil",
        "tostring_raises: error in error handling: the value raised could not be turned into text",
        "test test/errors_test.luau::tostring_loops ... FAILED",
        "yields: attempt to yield across metamethod/C-call boundary",
        "test test/errors_test.luau::yields_forever ... FAILED (timeout)",
        "        .x: expected 2, got 1",
        "more bytes)",
        "test/deep_test.luau:1: <load>: syntax error: test/deep_test.luau:1: Exceeded allowed recursion depth",
        "test/huge_test.luau: <load>: ",
        "huge_test.luau is larger than max_source_bytes (1048576 bytes)",
        "test result: FAILED. 3 passed, 20 failed",
    ] {
        assert!(stdout.contains(expect), "missing {expect:?} in:\n{stdout}");
    }
    assert!(stdout
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .starts_with("test result: FAILED."));
    strict_xml(&std::fs::read_to_string(&junit).unwrap());

    let out = run(&["test", d, "--timeout-ms", "2000", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 20);
    for t in report["tests"].as_array().unwrap() {
        assert!(
            t["message"].as_str().unwrap().len() < 17_000,
            "{}",
            t["name"]
        );
        assert!(t["name"].as_str().unwrap().len() < 600);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--filter` is plain text: regex syntax matches itself, "" selects all.
#[test]
fn filter_text_is_literal_and_empty_selects_everything() {
    let dir = project(
        "filter",
        &[(
            "test/f_test.luau",
            b"return { [\"a.b\"] = function(t) end, axb = function(t) end, [\"c[*]\"] = function(t) end }",
        )],
    );
    let d = dir.to_str().unwrap();
    for (filter, ran) in [("a.b", 1), (".*", 0), ("[*]", 1), ("", 3), ("(", 0)] {
        let out = run(&["test", d, "--filter", filter]);
        assert!(out.status.success(), "{filter}: {}", text(&out.stdout));
        let expect = format!("{ran} passed, 0 failed");
        assert!(
            text(&out.stdout).contains(&expect),
            "{filter}: {}",
            text(&out.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
}

const STORE_V1: &str = "local m = {}\nfunction m.init(args) return { n = 1, items = { \"a\" } } end\nfunction m.handle_call(req, state) return state, state end\nfunction m.code_change(old, state, extra) return state end\nreturn m\n";

/// A git project whose committed `store` is [`STORE_V1`] and whose working
/// `store` has `code_change` doing `body`.
fn migrating(name: &str, body: &str) -> PathBuf {
    let dir = project(name, &[("src/store.luau", STORE_V1.as_bytes())]);
    git(&dir, &["init", "-q"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "v1"]);
    let v2 = STORE_V1.replace(
        "function m.code_change(old, state, extra) return state end",
        &format!("function m.code_change(old, state, extra) {body} end"),
    );
    std::fs::write(dir.join("src/store.luau"), v2).unwrap();
    dir
}

/// `code_change` functions that loop, raise a table, return cycles,
/// functions or nothing: each fails the module with the reason, bounded in
/// time, and `--json` stays one document.
#[test]
fn hostile_code_changes_fail_the_check_with_their_reason() {
    for (name, body, reason) in [
        ("loops", "while true do end", "ran past handler_ms"),
        ("raises", "error({ code = 1 })", "failed: table: 0x"),
        ("cycle", "local t = {}; t.t = t; return t", "cyclic value"),
        (
            "function",
            "return { f = function() end }",
            "a function is not plain data",
        ),
        ("nothing", "return nil", "returned no state"),
    ] {
        let dir = migrating(&format!("mig-{name}"), body);
        let d = dir.to_str().unwrap();
        let out = run(&["test", "--migrations", d, "--cases", "0"]);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: {stdout}{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains("migrating up (HEAD → working tree) failed"),
            "{name}: {stdout}"
        );
        assert!(stdout.contains(reason), "{name}: {stdout}");
        let out = run(&["test", "--migrations", d, "--cases", "0", "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["failed"], 1, "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// No history to compare with (not a git repository, or one without a
/// commit, and no node data): said on a note, not a silent "0 modules";
/// a committed previous version that does not compile fails the module.
#[test]
fn migrations_say_when_there_is_no_previous_version() {
    let dir = project("mig-nogit", &[("src/store.luau", STORE_V1.as_bytes())]);
    let out = run(&["test", "--migrations", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("is not in a git repository; nothing was checked"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["test", "--migrations", dir.to_str().unwrap(), "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap()
            .contains("not in a git repository"),
        "{report}"
    );

    git(&dir, &["init", "-q"]);
    let out = run(&["test", "--migrations", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("has no commit yet"),
        "{}",
        text(&out.stdout)
    );

    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "v1"]);
    let out = run(&["test", "--migrations", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        !text(&out.stdout).contains("note:"),
        "{}",
        text(&out.stdout)
    );

    std::fs::write(dir.join("src/store.luau"), "local m = {\n").unwrap();
    git(&dir, &["commit", "-qam", "broken"]);
    std::fs::write(
        dir.join("src/store.luau"),
        STORE_V1.replace("return state end", "state.x = 1 return state end"),
    )
    .unwrap();
    let out = run(&[
        "test",
        "--migrations",
        dir.to_str().unwrap(),
        "--cases",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("the previous version does not load"),
        "{}",
        text(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
