#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests use
# (curl as a real TLS client, dig for real DNS queries, Pebble as the ACME
# CA, PostgreSQL for the shared store; the tests start private clusters of
# it themselves; Chromium and chromedriver for the dashboard test), then builds once in release and runs every
# test. Release only: the end-to-end tests move gigabytes through TLS and
# QUIC, and one profile keeps the build to one pass.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
command -v pebble >/dev/null 2>&1 || need+=(pebble)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# The dashboard test drives a real headless Chromium over WebDriver.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# The packaging test builds .deb files (dpkg-shlibdeps fills Depends) and
# checks the systemd units.
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The layout test reads the binaries' symbol tables with nm.
command -v nm >/dev/null 2>&1 || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# cargo-deb builds the packages the packaging test inspects.
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb --version 2.12.1

# A thousand concurrent connections need a few thousand descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --workspace --all-targets
# Lints, including clippy's incompatible_msrv: the code may use nothing
# newer than the rust-version Cargo.toml declares.
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace --no-fail-fast "$@"

# A bounded coverage-guided run of every fuzz target (stable toolchain, own
# target dir); FUZZ_SECONDS=0 only replays the seed corpora.
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
