#!/usr/bin/env bash
# Graft vs Erlang/OTP, side by side, in one go.
#
# Usage: bench/compare.sh [--smoke]
#   1. cargo build --release -p graft-bench -p graft-cli (--smoke: the dev profile)
#   2. target/release/graft-bench [--smoke] WORKLOADS   (Graft workloads, JSON lines)
#   3. target/release/edit_to_live [--smoke]            (graft run + editor saves, JSON line)
#   4. target/release/http_spin [--smoke]               (HTTP calls to a bystander while 4
#                                                        sandboxes spin; Graft only, JSON lines)
#      target/release/http_auth [--smoke]               (what authentication costs a call)
#      target/release/durable [--smoke]                 (cost of durability: reload with and
#                                                        without a store, checkpoint, restore;
#                                                        printed, see docs/persistence.md)
#   5. bench/otp/run.sh [--smoke]                       (OTP workloads; installs erlang-base if missing)
#   6. bench/compare.py: one markdown table with goals and "met?", written to
#      docs/benchmarks.md (full run) or a temp file (--smoke), and printed.
#
# If Erlang cannot be installed or its run fails, the OTP column says n/a and
# this script still succeeds. A failing Graft workload fails the script.
# --smoke uses tiny sizes: it proves the suite works, its figures mean nothing.
#
# Environment: GRAFT_BENCH_WORKLOADS (default: every graft-bench workload but
# idle_1m), CARGO_TARGET_DIR (where the binaries are), ERL_FLAGS (for OTP).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="bench/compare.sh${*:+ $*}"
SMOKE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE="--smoke" ;;
    -h|--help) sed -n '2,19p' "$0" >&2; exit 0 ;;
    *) echo "compare.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[compare] $*" >&2; }
cd "$ROOT"

WORK="$(mktemp -d -t graft-compare.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
LOAD="$WORK/load.txt"
stamp() { echo "$1 $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '? ? ?')" >>"$LOAD"; }
START=$(date +%s)
stamp start

if [ -n "$SMOKE" ]; then
  # A smoke run proves the suite works; its figures mean nothing, so it uses
  # the dev profile (optimized in this workspace), which the tests built.
  log "building (dev profile: smoke)"
  cargo build -p graft-bench -p graft-cli >&2
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
else
  log "building (release)"
  cargo build --release -p graft-bench -p graft-cli >&2
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
stamp built

WORKLOADS="${GRAFT_BENCH_WORKLOADS:-baseline spawn_idle call_host call_proc reload reload_empty reload_empty_server sandbox_create batch_reload}"
log "graft-bench ${SMOKE:+$SMOKE }$WORKLOADS"
# shellcheck disable=SC2086  # word splitting of the workload list is wanted
"$BIN/graft-bench" $SMOKE $WORKLOADS >"$WORK/graft.jsonl"
stamp graft-bench

log "edit_to_live ${SMOKE}"
"$BIN/edit_to_live" $SMOKE --graft "$BIN/graft" >"$WORK/edit.jsonl"
stamp edit_to_live

log "http_spin ${SMOKE}"
"$BIN/http_spin" $SMOKE >"$WORK/spin.jsonl"
stamp http_spin

log "durable ${SMOKE}"
"$BIN/durable" $SMOKE >"$WORK/durable.jsonl"
cat "$WORK/durable.jsonl" >&2
stamp durable

log "http_auth ${SMOKE}"
"$BIN/http_auth" $SMOKE >"$WORK/auth.jsonl"
cat "$WORK/auth.jsonl" >&2
stamp http_auth

log "bench/otp/run.sh ${SMOKE}"
OTP_STATUS=ok
if ! "$ROOT/bench/otp/run.sh" $SMOKE >"$WORK/otp.jsonl"; then
  OTP_STATUS="bench/otp/run.sh failed (exit status non-zero; see its stderr above)"
  log "WARNING: $OTP_STATUS; the OTP column will say n/a"
fi
stamp otp

if [ -n "$SMOKE" ]; then
  OUT="$(mktemp -t graft-benchmarks-smoke.XXXXXX.md)"
else
  mkdir -p "$ROOT/docs"
  OUT="$ROOT/docs/benchmarks.md"
fi

python3 "$ROOT/bench/compare.py" \
  --graft "$WORK/graft.jsonl" --edit "$WORK/edit.jsonl" --otp "$WORK/otp.jsonl" \
  --spin "$WORK/spin.jsonl" --auth "$WORK/auth.jsonl" \
  --otp-status "$OTP_STATUS" --load "$LOAD" --command "$COMMAND" \
  --elapsed "$(( $(date +%s) - START ))" --graft-bin "$BIN/graft" \
  ${SMOKE:+--smoke} --out "$OUT"
log "written to $OUT"
