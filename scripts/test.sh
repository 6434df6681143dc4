#!/usr/bin/env bash
# Run every test: unit tests, and end-to-end tests that mount real FUSE file systems (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if [ "$(id -u)" != 0 ]; then
  echo "the end-to-end tests mount FUSE file systems and loop devices: run as root" >&2
  exit 1
fi
# Formatting and lints first: a change that fails them does not land.
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
# Release mode: the crash simulations and image comparisons run ~10x faster than in debug.
cargo test --release --all-targets --no-fail-fast -- --test-threads="${IMGFS_TEST_THREADS:-4}" 2>&1
