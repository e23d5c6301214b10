#!/usr/bin/env bash
# Regenerates server/layout/functions.txt and agent/layout/functions.txt: the
# functions edge-server and edge-agent run, hottest first. Their build
# scripts pass these lists to the linker (--symbol-ordering-file), which
# places those functions together at the start of .text. Without it the code
# a process runs is spread over nearly every 64 KiB of its 9-17 MB of text,
# and each page fault maps a 64 KiB window around the faulting page, so
# about 85% of the text ends up resident (docs/benchmarks.md, issue 16).
#
# How: the benchmarks run once, with small phases, with both binaries under
# valgrind's callgrind, which records every function executed (startup, the
# signal API, TLS termination, passthrough, HTTP/3, shutdown). Code paths
# that depend on the CPU (aws-lc's AVX-512 AES-GCM, which valgrind does not
# emulate) are added from `perf record` of a native run when perf exists.
#
# Needs valgrind (Debian `valgrind`), optionally perf (`linux-perf`). Takes a
# few minutes. Run it after dependency updates or large changes: symbols that
# no longer exist are skipped by the linker, so a stale list only loses
# compactness (tests/tests/layout.rs fails when too much of it is stale).
# The list is only valid for binaries built the way scripts/test.sh builds
# them (`cargo build --release --workspace --all-targets`) by the rustc in
# layout/toolchain.txt: another feature set, profile or compiler changes the
# hashes in the symbols' names.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

cargo build --release --workspace --all-targets
work=$(mktemp -d)
trap 'pkill -TERM -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
for bin in edge-bench edge-passthrough-bench edge-h3-bench edge-bench-upstream; do
    cp "target/release/$bin" "$work/"
done
# The benchmarks find edge-server and edge-agent beside themselves. These
# wrappers run the real ones under callgrind in the background, so that the
# benchmarks' SIGKILL ends only the wrapper; the script then stops each
# valgrind with SIGTERM, the binaries shut down cleanly and callgrind writes
# its profile.
for bin in edge-server edge-agent; do
    cat > "$work/$bin" <<EOF
#!/bin/sh
valgrind --tool=callgrind --demangle=no --dump-instr=no --compress-strings=no \
    --callgrind-out-file="$work/callgrind.$bin.%p" "$PWD/target/release/$bin" "\$@" &
wait
EOF
    chmod +x "$work/$bin"
done

stop_valgrinds() {
    pkill -TERM -f "valgrind.*$work/callgrind" 2>/dev/null || true
    for _ in $(seq 1 60); do
        pgrep -f "valgrind.*$work/callgrind" >/dev/null || return 0
        sleep 1
    done
    echo "valgrind processes did not stop after 60 s" >&2
    pkill -KILL -f "valgrind.*$work/callgrind" || true
}

run() {
    echo "layout: $*" >&2
    # A benchmark under valgrind is slow and its figures meaningless; only the
    # code paths it drives matter, so its failures are reported, not fatal.
    (cd "$work" && timeout 900 "$@" >/dev/null 2>"$work/last.log") || {
        echo "  (exited with $?; last lines:)" >&2
        tail -3 "$work/last.log" >&2
    }
    stop_valgrinds
}
run ./edge-passthrough-bench --rounds 1 --seconds 2 --mib 8 --workers 4
run ./edge-bench --rounds 1 --seconds 2 --mib 8 --idle 50 --workers 4
run ./edge-h3-bench --rounds 1 --seconds 2 --mib 2 --workers 4

# Native runs: CPU-specific paths valgrind does not take, by sampling.
if command -v perf >/dev/null; then
    for bin in edge-server edge-agent; do
        ln -sf "$PWD/target/release/$bin" "$work/$bin"
    done
    (cd "$work" && perf record -q -F 2999 -g -o "$work/perf.data" -- \
        ./edge-passthrough-bench --rounds 1 --seconds 2 >/dev/null 2>&1) || true
fi

for bin in edge-server edge-agent; do
    out="${bin#edge-}/layout/functions.txt"
    {
        # Self cost per function of this binary, over every profile.
        cat "$work"/callgrind."$bin".* | awk -v obj="/$bin" '
            /^ob=/ { ob = substr($0, 4); next }
            /^fn=/ { fn = (substr(ob, length(ob) - length(obj) + 1) == obj) ? substr($0, 4) : ""; if (fn != "") cost[fn] += 0; next }
            /^calls=/ { skip = 1; next }
            /^[0-9+*-]/ { if (skip) { skip = 0; next } if (fn != "") cost[fn] += $2; next }
            END { for (f in cost) print cost[f] "\t" f }'
        if [ -f "$work/perf.data" ]; then
            perf report -i "$work/perf.data" --no-demangle --no-children --dsos "$bin" \
                --sort sym --stdio 2>/dev/null | awk '$0 !~ /^#/ && /\[\.\]/ { print 0 "\t" $NF }'
        fi
    } | sort -t "$(printf '\t')" -k1,1nr | cut -f2 |
        # callgrind marks recursion levels with 'N and names what it could
        # not resolve by address or "(below main)": neither is a symbol.
        sed "s/'[0-9]*\$//" | grep -v -e '^0x' -e '^(' | awk 'NF && !seen[$0]++' > "$out"
    rustc -V > "${bin#edge-}/layout/toolchain.txt"
    echo "layout: $out: $(wc -l < "$out") functions" >&2
done
