#!/usr/bin/env bash
# Build the side tree with qemu-storage-daemon 11 that `BENCH_QSD11=DIR scripts/bench.sh` runs
# (this host's libc is too old for Debian's QEMU 11 packages, so they live in their own root and
# run through its dynamic loader). Usage: scripts/qsd11-tree.sh [DIR]  (default /var/tmp/qemu11-sid;
# about 200 MB from Debian's mirrors; needs root). On a Debian 13 host use trixie-backports
# instead of sid: SUITE=trixie-backports.
set -euo pipefail
dir=${1:-/var/tmp/qemu11-sid}
suite=${SUITE:-sid}
command -v mmdebstrap >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq mmdebstrap >/dev/null
}
if [ ! -x "$dir/usr/bin/qemu-storage-daemon" ]; then
  mmdebstrap --variant=apt --include=qemu-utils,fuse3 \
    --aptopt='Acquire::Check-Valid-Until "false"' "$suite" "$dir"
fi
QEMU_MODULE_DIR="$dir/usr/lib/x86_64-linux-gnu/qemu" "$dir/lib64/ld-linux-x86-64.so.2" \
  --library-path "$dir/usr/lib/x86_64-linux-gnu:$dir/lib/x86_64-linux-gnu" \
  "$dir/usr/bin/qemu-storage-daemon" --version | head -1
echo "now: BENCH_QSD11=$dir bash scripts/bench.sh"
