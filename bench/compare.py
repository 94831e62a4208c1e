#!/usr/bin/env python3
"""Merge Graft's and Erlang/OTP's benchmark JSON lines into one markdown table.

Called by bench/compare.sh; standard library only. Inputs are files of one JSON
object per line: graft-bench's workloads, edit_to_live's line, http_spin's
lines (optional; Graft only), and bench/otp/run.sh's output (may be empty: then
the OTP column says n/a).

    compare.py --graft G.jsonl --edit E.jsonl --otp O.jsonl [--spin S.jsonl] [--otp-status TEXT]
               [--load LOAD.txt] [--command CMD] [--elapsed SECONDS]
               [--graft-bin PATH] [--smoke] [--out FILE]

Ratios are OTP / Graft for costs (time, bytes), so > 1 means Graft is better.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"compare.py: {path}:{n}: not JSON ({e}): {line[:120]}", file=sys.stderr)
    return out


def by_workload(rows, name):
    return [r for r in rows if r.get("workload") == name]


def one(rows, name):
    rs = by_workload(rows, name)
    return rs[0] if rs else None


# ---------------------------------------------------------------- formatting

def sig3(x):
    """Three significant digits (at least the integer part)."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ns(ns):
    if ns is None:
        return "n/a"
    if ns >= 1e9:
        return f"{sig3(ns / 1e9)} s"
    if ns >= 1e6:
        return f"{sig3(ns / 1e6)} ms"
    if ns >= 1e3:
        return f"{sig3(ns / 1e3)} µs"
    return f"{ns:.0f} ns"


def fmt_us(us):
    return "n/a" if us is None else fmt_ns(us * 1000.0)


def fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b:,.0f} B"


def fmt_n(n):
    if n is None:
        return "?"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def ratio(otp, graft):
    if otp is None or graft is None or graft <= 0:
        return None
    return otp / graft


def fmt_ratio(r):
    if r is None:
        return "n/a"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


# ---------------------------------------------------------------- environment

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram():
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kb = int(line.split()[1])
                    return f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def os_name():
    pretty = None
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    pretty = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    kernel = f"{platform.system()} {platform.release()}"
    return f"{pretty}, {kernel}" if pretty else kernel


def debounce_ms():
    """The CLI watcher's debounce, read from graft-cli's source (it is a constant)."""
    path = os.path.join(ROOT, "crates", "graft-cli", "src", "watch.rs")
    try:
        with open(path, encoding="utf-8") as f:
            m = re.search(r"const DEBOUNCE: Duration = Duration::from_millis\((\d+)\)", f.read())
            return int(m.group(1)) if m else None
    except OSError:
        return None


# ---------------------------------------------------------------- the table

class Table:
    def __init__(self, otp_ok):
        self.rows = []
        self.otp_ok = otp_ok

    def ratio_row(self, label, g, o, fmt, goal=None, note=""):
        """A cost row: ratio OTP/Graft; goal is a minimum ratio or None."""
        r = ratio(o, g) if self.otp_ok else None
        if goal is None:
            goal_s, met = "—", "—"
        else:
            goal_s = f"≥ {goal:g}×"
            met = "n/a" if r is None else ("yes" if r >= goal else "no")
        self.rows.append([label, fmt(g), fmt(o) if self.otp_ok else "n/a",
                          fmt_ratio(r), goal_s, met, note])

    def abs_row(self, label, g, o, fmt, limit=None, limit_s="", note=""):
        """A row with an absolute goal on the Graft figure (g <= limit)."""
        r = ratio(o, g) if self.otp_ok else None
        if limit is None:
            met = "—"
            limit_s = "—"
        else:
            met = "n/a" if g is None else ("yes" if g <= limit else "no")
        self.rows.append([label, fmt(g), fmt(o) if self.otp_ok else "n/a",
                          fmt_ratio(r), limit_s, met, note])

    def graft_only_row(self, label, g, fmt, limit, limit_s, note):
        """A Graft figure with no OTP counterpart and an absolute goal (g <= limit)."""
        met = "n/a" if g is None else ("yes" if g <= limit else "no")
        self.rows.append([label, fmt(g), "—", "—", limit_s, met, note])

    def markdown(self):
        head = ["workload", "Graft", "OTP", "ratio (OTP/Graft, >1 means Graft is better)",
                "goal", "met?", "notes"]
        lines = ["| " + " | ".join(head) + " |",
                 "| " + " | ".join(["---"] * len(head)) + " |"]
        for r in self.rows:
            cells = [c.replace("|", "\\|") for c in r]
            if cells[5] == "no":
                cells[5] = "**no**"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def pair_by_size(g_rows, o_rows):
    """Pair Graft and OTP rows of one workload by size rank (smallest with smallest)."""
    g = sorted(g_rows, key=lambda r: r.get("n", 0))
    o = sorted(o_rows, key=lambda r: r.get("n", 0))
    out = []
    for i in range(max(len(g), len(o))):
        out.append((g[i] if i < len(g) else None, o[i] if i < len(o) else None))
    return out


def size_label(what, g, o, otp_ok, after=""):
    """`what 10k after`, or `what after (Graft n=200, OTP n=1k)` when the sizes differ."""
    gn = g.get("n") if g else None
    on = o.get("n") if o else None
    if not otp_ok or on is None or gn == on:
        return f"{what} {fmt_n(gn)}{after}"
    return f"{what}{after} (Graft n={fmt_n(gn)}, OTP n={fmt_n(on)})"


def get(row, key):
    if row is None:
        return None
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def build(args):
    graft = read_jsonl(args.graft)
    edit = read_jsonl(args.edit)
    otp = read_jsonl(args.otp)
    otp_meta = one(otp, "meta")
    otp_ok = bool(otp_meta) and args.otp_status == "ok"
    g_meta = one(graft, "meta") or {}
    t = Table(otp_ok)

    # spawn, and memory per idle server (same runs)
    pairs = pair_by_size(by_workload(graft, "spawn_idle"), by_workload(otp, "spawn_idle"))
    for g, o in pairs:
        first = ""
        if g is not None and get(g, "per_op_ns_first") is not None:
            first = f"; Graft's first run (fresh memory): {fmt_ns(get(g, 'per_op_ns_first'))}"
        t.ratio_row(size_label("spawn", g, o, otp_ok, ", per spawn"),
                    get(g, "per_op_ns"), get(o, "per_op_ns"), fmt_ns, goal=3,
                    note="Graft: graft.spawn from a Luau loop; OTP: gen_server:start/3; "
                         "both the median of 5 (10k) or 3 (100k) runs, each in a fresh "
                         "sandbox / process" + first)
    for g, o in pairs:
        note = ""
        if g is not None:
            note = (f"Graft = Luau heap {fmt_bytes(get(g, 'luau_heap_per_process_bytes'))}"
                    f" + kernel records {fmt_bytes(get(g, 'rust_heap_per_process_bytes'))}")
        if o is not None and otp_ok:
            note += f"; OTP process_info: {fmt_bytes(get(o, 'proc_info_memory_bytes'))}"
        t.ratio_row(size_label("memory per idle server", g, o, otp_ok, " processes"),
                    get(g, "memory_per_process_bytes"), get(o, "mem_per_proc_bytes"),
                    fmt_bytes, goal=3, note=note + " (goal: ≤ ⅓ of OTP's)")

    # calls
    t.ratio_row("call host → process", get(one(graft, "call_host"), "per_op_ns"),
                get(one(otp, "call_host"), "per_op_ns"), fmt_ns,
                note="Graft: Sandbox::call (async) via block_on from Rust; "
                     "OTP: gen_server:call from a plain process; both the median of 5 runs "
                     "of 100k calls")
    t.ratio_row("call host → process, blocking", get(one(graft, "call_host_blocking"), "per_op_ns"),
                get(one(otp, "call_host"), "per_op_ns"), fmt_ns, goal=1,
                note="Graft: Sandbox::call_blocking (the handler runs on the caller's thread "
                     "when the sandbox is idle); OTP: gen_server:call as above")
    t.ratio_row("call process → process", get(one(graft, "call_proc"), "per_op_ns"),
                get(one(otp, "call_proc"), "per_op_ns"), fmt_ns, goal=3,
                note="graft.call / gen_server:call inside a handler")

    # reload with migration of N live processes
    o_best = []
    seq = sorted(by_workload(otp, "reload_seq"), key=lambda r: r.get("n", 0))
    par = sorted(by_workload(otp, "reload_par"), key=lambda r: r.get("n", 0))
    for i in range(max(len(seq), len(par))):
        cands = [r for r in (seq[i] if i < len(seq) else None,
                             par[i] if i < len(par) else None) if r]
        o_best.append(min(cands, key=lambda r: r["total_us"]))
    # 10k: the reshape issue's goal (≥ 15× OTP); 100k: wave 1's.
    goals = [15, 8]
    for i, (g, o) in enumerate(pair_by_size(by_workload(graft, "reload"), o_best)):
        note = ""
        if g is not None:
            note = f"Graft swap {fmt_us(get(g, 'swap_us'))}"
        if o is not None and otp_ok:
            others = {r["workload"]: r["total_us"] for r in by_workload(otp, "reload_seq")
                      + by_workload(otp, "reload_par") if r.get("n") == o.get("n")}
            note += (f"; OTP = {o['workload']} (seq {fmt_us(others.get('reload_seq'))}, "
                     f"par {fmt_us(others.get('reload_par'))})")
        t.ratio_row(size_label("reload with migration of", g, o, otp_ok, " live processes"),
                    get(g, "total_us"), get(o, "total_us"), fmt_us,
                    goal=goals[i] if i < len(goals) else None, note=note)

    # reload of a module no process runs
    ge = one(graft, "reload_empty")
    oe = one(otp, "reload_empty")
    o_sum = None
    if oe:
        parts = [get(oe, k) for k in ("compile_us", "purge_us", "load_us")]
        o_sum = sum(parts) if None not in parts else None
    t.ratio_row("reload, no processes: total", get(ge, "total_us"), o_sum, fmt_us,
                note="Graft: whole reload call; OTP: compile + purge + load (medians); "
                     f"Graft module `return {{ v = N }}`, OTP a {oe.get('source_bytes', '?')}-byte gen_server"
                     if oe else "Graft: whole reload call")
    t.ratio_row("reload, no processes: compile", get(ge, "compile_us"), get(oe, "compile_us"),
                fmt_us, note="Graft compile_us / OTP compile:file")
    t.ratio_row("reload, no processes: load", get(ge, "swap_us"), get(oe, "load_us"), fmt_us,
                note="Graft swap_us / OTP code:load_binary"
                     + (f" (OTP soft_purge another {fmt_us(get(oe, 'purge_us'))})" if oe and otp_ok else ""))
    gs = one(graft, "reload_empty_server")
    if gs:
        t.ratio_row("reload, no processes: total, server-sized module", get(gs, "total_us"), o_sum,
                    fmt_us, note=f"Graft reloads a {get(gs, 'source_bytes'):.0f}-byte counter server "
                                 f"(compile {fmt_us(get(gs, 'compile_us'))}, swap {fmt_us(get(gs, 'swap_us'))})")

    # edit to live
    ge2 = one(edit, "edit_to_live")
    oe2 = one(otp, "edit_to_live")
    deb = debounce_ms()
    poll = f"OTP watcher polls every {oe2.get('poll_ms')} ms" if oe2 and otp_ok else ""
    t.abs_row("edit-to-live p50", get(ge2, "p50_us"), get(oe2, "p50_us"), fmt_us,
              limit=20_000, limit_s="≤ 20 ms",
              note=(f"graft run's watcher debounce: {deb} ms (fixed in graft-cli)" if deb else "")
              + ("; " if deb and poll else "") + poll)
    t.abs_row("edit-to-live p99", get(ge2, "p99_us"), get(oe2, "p99_us"), fmt_us,
              note=f"{int(ge2['saves'])} saves: p99 = max" if ge2 and ge2.get("saves", 0) <= 100 else "")
    t.abs_row("edit-to-live max", get(ge2, "max_us"), get(oe2, "max_us"), fmt_us,
              limit=50_000, limit_s="≤ 50 ms",
              note=(f"Graft min {fmt_us(get(ge2, 'min_us'))}; reload itself (compile+swap) "
                    f"p50 {fmt_us(get(ge2, 'reload_line_us_p50'))}") if ge2 else "")
    spin_row(t, read_jsonl(args.spin))
    auth_row(t, read_jsonl(args.auth))
    return graft, edit, otp, otp_meta, otp_ok, g_meta, t, deb


def auth_row(t, rows):
    """http_auth: an authenticated call over its unauthenticated twin, same run (goal ≤ 1.05)."""
    summary = next((r for r in rows if r.get("summary") == "http_auth"), None)
    if summary is None:
        return
    per_call = {r["target"]: r.get("median_us_per_call") for r in rows if "target" in r}
    note = (f"Graft only (`http_auth`, median of per-round ratios): per call "
            f"{fmt_us(per_call.get('base'))} without auth, {fmt_us(per_call.get('auth'))} with; "
            f"noise floor (the same router twice) {get(summary, 'control_over_base') or 0:.3f}; "
            f"with `--audit-messages` {get(summary, 'audited_over_base') or 0:.2f}")
    t.graft_only_row("HTTP call with auth, over without", get(summary, "auth_over_base"),
                     lambda v: "n/a" if v is None else f"{v:.3f}×",
                     summary.get("goal_auth_over_base", 1.05), "≤ 1.05", note)


def spin_phases(rows):
    return (next((r for r in rows if r.get("phase") == "baseline"), None),
            next((r for r in rows if r.get("phase") == "spin"), None))


def spin_row(t, rows):
    """http_spin: the bystander's p99 over HTTP while sandboxes spin (goal ≤ 5 ms)."""
    base, spin = spin_phases(rows)
    if spin is None:
        return
    note = (f"Graft only (`http_spin`, {spin.get('conns')} connections, spinners "
            f"{'+'.join(spin_kinds(rows))}): p50 {fmt_us(get(spin, 'p50_us'))}, "
            f"{get(spin, 'requests_per_s') or 0:,.0f} req/s")
    if base is not None:
        r = ratio(get(spin, "p99_us"), get(base, "p99_us"))
        note += (f"; without spinners p99 {fmt_us(get(base, 'p99_us'))}, "
                 f"{get(base, 'requests_per_s') or 0:,.0f} req/s (p99 ratio {fmt_ratio(r)})")
    t.graft_only_row(f"HTTP call p99 while {spin.get('spinners')} sandboxes spin",
                     get(spin, "p99_us"), fmt_us, 5_000, "≤ 5 ms", note)


def spin_kinds(rows):
    meta = next((r for r in rows if r.get("workload") == "meta"), None) or {}
    return meta.get("spinner_kinds") or ["?"]


def header(args, otp_meta, otp_ok, g_meta):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_lines = []
    if args.load and os.path.exists(args.load):
        with open(args.load, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    load_lines.append(f"{parts[0]} {parts[1]}")
    rustc = sh("rustc", "--version") or "unknown"
    graft_v = g_meta.get("graft", "?")
    if args.graft_bin:
        cli = sh(args.graft_bin, "--version")
        if cli:
            graft_v += f" (`{cli}`)"
    git = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD")
    dirty = sh("git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no")
    if git:
        graft_v += f", commit {git}" + (" + uncommitted changes" if dirty else "")
    if otp_meta:
        otp = (f"OTP {otp_meta.get('otp_release')}, erts {otp_meta.get('erts')}, "
               f"{otp_meta.get('schedulers_online')} schedulers online")
        if not otp_ok:
            otp += f" (run failed: {args.otp_status})"
    else:
        otp = f"n/a ({args.otp_status if args.otp_status != 'ok' else 'no OTP output'})"
    lines = [
        "# Graft vs Erlang/OTP: latest benchmark run" + (" (SMOKE: tiny sizes, figures meaningless)" if args.smoke else ""),
        "",
        f"* **command**: `{args.command}`" + (f" (took {int(args.elapsed)} s)" if args.elapsed else ""),
        f"* **date**: {now}",
        f"* **machine**: {os.cpu_count()} CPUs (nproc {sh('nproc') or '?'}), {cpu_model()}, {ram()} RAM",
        f"* **OS**: {os_name()}",
        f"* **rustc**: {rustc}",
        f"* **Graft**: {graft_v}, {g_meta.get('threads', '?')} scheduler threads",
        f"* **Erlang/OTP**: {otp}",
        "* **load average (1/5/15 min)**: " + (", ".join(load_lines) if load_lines else "unknown")
        + (f"; OTP saw {otp_meta.get('loadavg_1m')} at its start" if otp_meta else ""),
    ]
    return "\n".join(lines)


def notes(graft, edit, otp, otp_ok, deb, args, spin):
    out = ["## How to read this", ""]
    out += [
        "* Ratio = OTP / Graft for costs (time per op, bytes, latency), so > 1 means Graft is "
        "better. Ratio goals are met when the ratio reaches the goal; the edit-to-live goals are "
        "absolute limits on Graft's own figure.",
        "* Graft figures come from `target/release/graft-bench` (medians; see "
        "`crates/graft-bench/src/main.rs`) and `target/release/edit_to_live` "
        "(`crates/graft-bench/src/bin/edit_to_live.rs`); OTP figures from `bench/otp/run.sh` "
        "(medians; see `bench/otp/README.md`).",
        "* Graft memory per process counts every allocation (mlua allocates the Luau heap through "
        "Rust's allocator, so the Luau heap is counted once, as a part); OTP's is "
        "`erlang:memory(processes)` growth / N.",
        "* Reload with migration: OTP is the faster of `reload_seq` and `reload_par` "
        "(suspend, load, `sys:change_code`, resume, as release_handler does).",
        "* Edit-to-live: save like an editor (write temp + rename), then poll until the new code "
        "answers. Graft goes through `graft run` (file watcher + HTTP API); OTP through a polling "
        "gen_server watcher (`bench_watcher`) and direct function calls.",
        "* HTTP call while sandboxes spin (`target/release/http_spin`, Graft only): "
        "`POST …/bystander/call` to a counter from keep-alive connections, each sending as soon "
        "as its answer arrived, first without spinners, then while sandboxes loop forever (plain "
        "Luau and inside `table.sort` / `gsub` callbacks, `handler_ms` 60 s); latency is send to "
        "body read. Node, API and load generator share the machine's cores with the spinners.",
    ]
    ge = one(edit, "edit_to_live")
    if ge and deb:
        out.append(
            f"* Graft's edit-to-live is bounded below by `graft run`'s watcher debounce "
            f"(`DEBOUNCE` = {deb} ms in `crates/graft-cli/src/watch.rs`, not a CLI option): "
            f"the reload itself took {fmt_us(ge.get('reload_line_us_p50'))} (p50, from the "
            f"`✓` lines), the rest is waiting for the debouncer.")
    if not otp_ok:
        out.append(f"* OTP column n/a: {args.otp_status}.")
    out += ["", "## Other figures", ""]
    extra = []
    for r in graft:
        w = r.get("workload")
        if w == "baseline_mlua_call":
            extra.append(f"* Graft baseline: a bare mlua call of a Luau function: {fmt_ns(r.get('per_op_ns'))}")
        elif w == "sandbox_create":
            extra.append(f"* Graft sandbox create: {fmt_us(r.get('per_op_us'))} "
                         f"(resident {fmt_bytes(r.get('resident_bytes'))} per sandbox; allocated "
                         f"{fmt_bytes(r.get('memory_bytes'))}, of it Luau heap pages {fmt_bytes(r.get('luau_heap_bytes'))})")
        elif w == "batch_reload":
            extra.append(f"* Graft batch reload of {r.get('sandboxes')} sandboxes: "
                         f"{fmt_us(r.get('total_us'))} (max_concurrency {r.get('max_concurrency')})")
    if otp_ok:
        for r in by_workload(otp, "spawn_idle") + by_workload(otp, "call_host") + by_workload(otp, "call_proc"):
            extra.append(f"* OTP {r['workload']} {fmt_n(r.get('n') or r.get('m'))}: best run "
                         f"{fmt_ns(r.get('per_op_ns_best'))} per op (median {fmt_ns(r.get('per_op_ns'))})")
        for r in by_workload(otp, "reload_seq") + by_workload(otp, "reload_par"):
            extra.append(f"* OTP {r['workload']} {fmt_n(r.get('n'))}: median {fmt_us(r.get('total_us'))}, "
                         f"best {fmt_us(r.get('total_us_best'))} (suspend {fmt_us(r.get('suspend_us'))}, "
                         f"load {fmt_us(r.get('load_us'))}, change+resume {fmt_us(r.get('change_resume_us'))})")
        oe = one(otp, "edit_to_live")
        if oe:
            extra.append(f"* OTP edit_to_live: watcher compile {fmt_us(oe.get('watcher_compile_us'))}, "
                         f"purge+load {fmt_us(oe.get('watcher_load_us'))} (medians)")
    for r in spin_phases(spin):
        if r is not None:
            extra.append(f"* Graft http_spin, {r['phase']} ({r.get('spinners')} spinners): "
                         f"{r.get('requests')} calls in {r.get('seconds', 0):.1f} s; p50 "
                         f"{fmt_us(get(r, 'p50_us'))}, p90 {fmt_us(get(r, 'p90_us'))}, p99 "
                         f"{fmt_us(get(r, 'p99_us'))}, p99.9 {fmt_us(get(r, 'p999_us'))}, "
                         f"max {fmt_us(get(r, 'max_us'))}")
    out += extra or ["* none"]
    out += ["", "## Raw results", "", "<details><summary>JSON lines</summary>", "", "```"]
    for src, rows in (("graft-bench", graft), ("edit_to_live", edit), ("http_spin", spin),
                      ("http_auth", read_jsonl(args.auth)), ("otp", otp)):
        for r in rows:
            out.append(f"{src}: {json.dumps(r, sort_keys=True)}")
    out += ["```", "", "</details>"]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graft", required=True)
    p.add_argument("--edit", required=True)
    p.add_argument("--otp", required=True)
    p.add_argument("--spin")
    p.add_argument("--auth")
    p.add_argument("--otp-status", default="ok")
    p.add_argument("--load")
    p.add_argument("--command", default="bench/compare.sh")
    p.add_argument("--elapsed", type=float)
    p.add_argument("--graft-bin")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()

    graft, edit, otp, otp_meta, otp_ok, g_meta, table, deb = build(args)
    if not graft:
        print("compare.py: no Graft results", file=sys.stderr)
        return 1
    doc = "\n\n".join([header(args, otp_meta, otp_ok, g_meta), table.markdown(),
                       notes(graft, edit, otp, otp_ok, deb, args, read_jsonl(args.spin))]) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(doc)
    sys.stdout.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
