#!/usr/bin/env bash
# Issue-7 reliability numbers: >= 1,000 simulated power cuts per writable format (engine on the
# fault-injecting host file) and >= 20 kill -9 runs per format against real mounted daemons;
# powercut_resize_* add online grows to the workload (IMGFS_CUTS/8 cuts per format).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export IMGFS_CUTS=${IMGFS_CUTS:-1000} IMGFS_KILL_RUNS=${IMGFS_KILL_RUNS:-20}
cargo test --release --test powercut --test reliability --test vmdk_crash -- --nocapture --test-threads=2 2>&1 |
  grep -E "power cuts survived|kill -9 runs|not registered|panicked|test result"
