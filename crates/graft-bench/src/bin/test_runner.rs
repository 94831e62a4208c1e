//! `test_runner`: wall time of `graft test` through the real binary, the
//! way a developer (or CI) runs it, against baselines measured in the same
//! run.
//!
//! Workloads, each on a project made by `graft new` in a temp dir:
//! * `scaffold_10`: the scaffold's own 5 tests plus 5 generated ones
//!   (10 tests, each in a fresh sandbox with the app started);
//! * `generated_1000`: the same project with 1,000 tests (calls and casts
//!   against the counter).
//!
//! Baselines, same machine, same run: `graft check` on the same project
//! (process start, project load, one sandbox built and dropped: what every
//! `graft test` run pays once), and in-process `Node::create_sandbox` +
//! `destroy` of the scaffold (what each test pays at least). The report
//! gives medians and the ratios `test / check` and, for 1,000 tests, the
//! per-test cost over the bare sandbox create.
//!
//! Usage: `test_runner [--smoke] [--graft PATH] [--runs N]`. The binary
//! comes from `--graft`, else `$GRAFT_BIN`, else `graft` next to this
//! executable (build both with `--release`). Prints one JSON object.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

fn usage() -> ! {
    eprintln!("usage: test_runner [--smoke] [--graft PATH] [--runs N]");
    std::process::exit(2)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `graft ARGS` once; panics with its output when it fails.
fn graft(bin: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "graft {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn timed(bin: &Path, args: &[&str], runs: usize) -> Duration {
    graft(bin, args); // warm the page cache
    median((0..runs).map(|_| graft(bin, args)).collect())
}

/// `n` generated tests against the scaffold's counter.
fn generated_tests(n: usize) -> String {
    let mut s = String::from("local tests = {}\n");
    for i in 0..n {
        s.push_str(&format!(
            "function tests.case_{i:04}(t)\n\tt.cast(\"counter\", {i})\n\tt.eq(t.call(\"counter\", \"get\"), {i})\nend\n"
        ));
    }
    s.push_str("return tests\n");
    s
}

fn project(bin: &Path, root: &Path, name: &str, generated: usize) -> PathBuf {
    let dir = root.join(name);
    graft(bin, &["new", dir.to_str().expect("utf-8 path")]);
    std::fs::write(dir.join("test/bench_test.luau"), generated_tests(generated))
        .expect("write the generated tests");
    dir
}

/// In-process create + destroy of the scaffold's sandbox (median, µs).
fn sandbox_create(dir: &Path, n: usize) -> Duration {
    let node = graft::Node::with_threads(2);
    let spec = graft::SandboxSpec::from_dir(dir).expect("the scaffold loads");
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = spec.clone();
        s.id = format!("b{i}");
        let started = Instant::now();
        let sb = graft::block_on(node.create_sandbox(s)).expect("create");
        graft::block_on(sb.wait_app_started()).expect("app");
        node.destroy(sb.id()).expect("destroy");
        times.push(started.elapsed());
    }
    median(times)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut smoke = false;
    let mut bin = std::env::var_os("GRAFT_BIN").map(PathBuf::from);
    let mut runs = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--graft" => bin = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--runs" => {
                runs = Some(
                    args.next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|n| *n > 0)
                        .unwrap_or_else(|| usage()),
                )
            }
            _ => usage(),
        }
    }
    let bin = bin.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("current_exe")
            .with_file_name(format!("graft{}", std::env::consts::EXE_SUFFIX))
    });
    let runs = runs.unwrap_or(if smoke { 1 } else { 7 });
    let big = if smoke { 100 } else { 995 };
    let root = std::env::temp_dir().join(format!("graft-bench-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("temp dir");

    let small_dir = project(&bin, &root, "small", 5);
    let big_dir = project(&bin, &root, "big", big);
    let small = small_dir.to_str().expect("utf-8 path");
    let big_s = big_dir.to_str().expect("utf-8 path");

    let check = timed(&bin, &["check", small], runs);
    let test_10 = timed(&bin, &["test", small], runs);
    let test_1000 = timed(&bin, &["test", big_s], runs);
    let create = sandbox_create(&small_dir, if smoke { 20 } else { 200 });
    let tests_big = big + 5;
    let per_test = test_1000.saturating_sub(check) / tests_big as u32;

    let report = json!({
        "workload": "graft_test",
        "smoke": smoke,
        "runs": runs,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "check_ms": ms(check),
        "scaffold_10_ms": ms(test_10),
        "generated_tests": tests_big,
        "generated_ms": ms(test_1000),
        "sandbox_create_us": create.as_secs_f64() * 1e6,
        "per_test_us": per_test.as_secs_f64() * 1e6,
        "ratio_scaffold_10_to_check": ms(test_10) / ms(check),
        "ratio_generated_to_check": ms(test_1000) / ms(check),
        "ratio_per_test_to_sandbox_create": per_test.as_secs_f64() / create.as_secs_f64(),
    });
    println!("{report}");
    let _ = std::fs::remove_dir_all(&root);
}
