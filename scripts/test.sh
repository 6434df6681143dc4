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
threads="${IMGFS_TEST_THREADS:-4}"
# The whole suite runs once per FUSE request transport (imgfs reads IMGFS_TRANSPORT as its
# --transport default): the classic /dev/fuse loop, then FUSE-over-io_uring. Release mode: the
# crash simulations and image comparisons run ~10x faster than in debug.
rc=0
echo "=== tests with --transport dev (/dev/fuse) ==="
IMGFS_TRANSPORT=dev cargo test --release --all-targets --no-fail-fast -- --test-threads="$threads" 2>&1 || rc=$?
param=/sys/module/fuse/parameters/enable_uring
if [ ! -f "$param" ]; then
  echo "SKIP the io_uring pass: this kernel has no FUSE-over-io_uring ($param missing; Linux 6.14+)"
elif [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 2 ]; then
  echo "SKIP the io_uring pass: io_uring is disabled (sysctl kernel.io_uring_disabled = 2)"
else
  echo Y > "$param"
  echo "=== end-to-end tests again with --transport uring (FUSE-over-io_uring) ==="
  IMGFS_TRANSPORT=uring cargo test --release --test '*' --no-fail-fast -- --test-threads="$threads" 2>&1 || rc=$?
fi
exit "$rc"
