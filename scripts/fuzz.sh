#!/usr/bin/env bash
# Bounded fuzz run on the STABLE toolchain, without cargo-fuzz.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 10 s, all)
#
# 0 seconds only replays the seed corpora once (a smoke test of the build).
#
# Builds fuzz/ with the same instrumentation cargo-fuzz would add (SanCov
# counters, PC table, compare tracing, `--cfg fuzzing`, debug assertions and
# overflow checks), then runs every target binary for SECONDS_PER_TARGET on a
# copy of its seed corpus (the repository's corpus is never written to). A
# crash prints the input that caused it and makes the script exit non-zero;
# the inputs stay in the printed directory. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# The braces make bash read the whole script before running any of it, so
# editing (or pulling) it during a long run does not derail that run.
{

secs="${1:-10}"
shift || true
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(client_hello quic_initial tunnel_frames dns_request signal_json handover alt_svc)
fi

# libfuzzer-sys compiles libFuzzer (C++) in its build script.
if ! command -v c++ >/dev/null 2>&1; then
  echo "installing: g++"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++
fi

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
# An explicit --target (the host's, as cargo-fuzz does) keeps RUSTFLAGS off
# build scripts and proc macros, which would not link against the SanCov
# hooks. Own target dir (fuzz/target): instrumented code never mixes with
# the workspace build, and changing RUSTFLAGS there does not rebuild it.
host="$(rustc -vV | sed -n 's/^host: //p')"
build_start=$(date +%s)
cargo build --release --manifest-path fuzz/Cargo.toml --target-dir fuzz/target --target "$host" \
  $(printf -- '--bin %s ' "${targets[@]}")
echo "fuzz build: $(( $(date +%s) - build_start )) s"

work="$(mktemp -d "${TMPDIR:-/tmp}/edge-fuzz.XXXXXX")"
failed=0
rows=()
for t in "${targets[@]}"; do
  bin="fuzz/target/$host/release/$t"
  corpus="$work/$t/corpus"
  artifacts="$work/$t/artifacts/"
  mkdir -p "$corpus" "$artifacts"
  if [ -d "fuzz/corpus/$t" ]; then
    cp -R "fuzz/corpus/$t/." "$corpus/"
  fi
  log="$work/$t/log"
  echo "== $t: ${secs}s"
  start=$(date +%s)
  set +e
  # (-max_total_time=0 would mean "no limit": 0 replays the corpus instead.)
  if [ "$secs" -eq 0 ]; then limit=-runs=0; else limit=-max_total_time="$secs"; fi
  "$bin" "$corpus" "$limit" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$artifacts" >"$log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  size=$(find "$corpus" -type f | wc -l)
  crash=$(find "$artifacts" -type f | head -n1)
  if [ "$rc" -eq 0 ] && [ -z "$crash" ]; then
    result=ok
    grep -E '^Done [0-9]+ runs' "$log" || true
  else
    failed=1
    result="FAILED (exit $rc)"
    sed -n '/panicked at/,+2p' "$log" | head -n 6
    grep -E '^(==[0-9]+== ERROR|SUMMARY)' "$log" | head -n 4 || true
    if [ -n "$crash" ]; then
      kind="$(basename "$crash")"
      result="${kind%%-*}"            # crash, timeout, oom, slow-unit
      echo "failing input: $crash"
      echo "  hex: $(od -An -tx1 -v "$crash" | tr -d ' \n' | cut -c1-512)"
      echo "  replay:   $bin $crash"
      echo "  minimize: $bin -minimize_crash=1 -runs=100000 -exact_artifact_path=$crash.min $crash"
    fi
    echo "full log: $log"
  fi
  rows+=("$(printf '%-14s %8s %12s %8s  %s' "$t" "$took" "${execs:-?}" "$size" "$result")")
done

echo
printf '%-14s %8s %12s %8s  %s\n' target seconds executions corpus result
for r in "${rows[@]}"; do echo "$r"; done
if [ "$failed" -ne 0 ]; then
  echo "fuzzing found a failure; inputs and logs are in $work" >&2
  exit 1
fi
rm -rf "$work"
exit 0
}
