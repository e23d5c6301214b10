#!/usr/bin/env bash
# A complete local demo on loopback, no root: builds the binaries, starts
# edge-server, one edge-agent and a tiny upstream, prints a curl line.
# Pass --check to run the curl itself and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v curl >/dev/null 2>&1; then
  echo "note: curl is not installed; the printed command needs it (apt-get install curl)" >&2
fi
cargo build --release --workspace --bins
exec target/release/edge-demo "$@"
