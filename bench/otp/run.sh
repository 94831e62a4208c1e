#!/usr/bin/env bash
# Erlang/OTP side of Graft's side-by-side benchmarks.
#
# Usage: bench/otp/run.sh [--smoke] [--only w1,w2,...]
#   --smoke   tiny sizes (N=100/1000, M=1000, ...), finishes in seconds
#   --only    comma list of: spawn_idle,call_host,call_proc,reload,reload_empty,edit_to_live
#
# stdout: one JSON object per line (first {"workload":"meta",...}).
# stderr: everything meant for people (install log, progress).
# Extra emulator flags: the standard ERL_FLAGS environment variable
# (e.g. ERL_FLAGS="+S 1" to pin to one scheduler).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE=full
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --only) shift; ONLY="${1:-}" ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) sed -n '2,12p' "$0" >&2; exit 0 ;;
    *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[otp-bench] $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  log "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Debian's erlang-base ships erts, kernel, stdlib, compiler and sasl, which is
# all this benchmark needs (erlc and the compile module come with it).
if ! command -v erl >/dev/null 2>&1 || ! command -v erlc >/dev/null 2>&1; then
  apt_install erlang-base
fi
has_compiler() {
  erl -noshell -noinput -eval \
    'case code:which(compile) of non_existing -> halt(1); _ -> halt(0) end.' >/dev/null 2>&1
}
if ! has_compiler; then
  # Not the case on Debian 12, where compiler is part of erlang-base; kept for
  # other layouts.
  apt_install erlang-dev erlang-tools
  has_compiler || { log "the Erlang compile module is still missing"; exit 1; }
fi

WORK="$(mktemp -d -t graft-otp-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/ebin" "$WORK/ebin_v2"

log "compiling into $WORK"
erlc -o "$WORK/ebin" \
  "$HERE/graft_otp_bench.erl" "$HERE/bench_counter.erl" \
  "$HERE/bench_caller.erl" "$HERE/bench_watcher.erl" >&2
erlc -o "$WORK/ebin_v2" "$HERE/v2/bench_counter.erl" >&2

log "running ($MODE)"
# No distribution (no -sname), so epmd is not started.  A crash dump, if any,
# goes to the temp dir.  Logger reports (crash reports etc.) go to stderr so
# stdout stays one JSON object per line.
export ERL_CRASH_DUMP="$WORK/erl_crash.dump"
exec_rc=0
erl -noshell -noinput -pa "$WORK/ebin" \
  -kernel logger '[{handler,default,logger_std_h,#{config => #{type => standard_error}}}]' \
  -run graft_otp_bench main "$MODE" "$WORK" "$HERE" "$ONLY" || exec_rc=$?
if [ "$exec_rc" -ne 0 ]; then
  log "benchmark failed (exit $exec_rc)"
  exit "$exec_rc"
fi
log "done"
