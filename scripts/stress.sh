#!/usr/bin/env bash
# Long model-checked stress runs (imgfs-stress) on every format case, niced.
#
#   bash scripts/stress.sh [--ops N] [--seed S] [--formats a,b,...] [--crash ROUNDS] [--fs-ops N]
#
# Per case: a model run of N ops (default 1,000,000), then (if ROUNDS > 0) a crash-mode run of
# ROUNDS kill -9 rounds, then (if --fs-ops > 0) the ext4 file-tree run. Every line goes to stdout and
# to target/stress/stress-DATE.log; the exit status is 1 if any run failed. The binaries are copied
# first, so rebuilding while a long run goes on does not change what it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ops=1000000
seed=$(( $(date +%s) ))
formats=""
crash=0
fsops=0
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) ops=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --formats) formats=$2; shift 2 ;;
    --crash) crash=$2; shift 2 ;;
    --fs-ops) fsops=$2; shift 2 ;;
    *) echo "usage: $0 [--ops N] [--seed S] [--formats a,b,...] [--crash ROUNDS] [--fs-ops N]" >&2; exit 2 ;;
  esac
done
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --bin imgfs --bin imgfs-stress >&2
bin=$(mktemp -d /tmp/imgfs-stress-bin.XXXXXX)
trap 'rm -rf "$bin"' EXIT
cp target/release/imgfs target/release/imgfs-stress "$bin/"
[ -n "$formats" ] || formats=$("$bin/imgfs-stress" --list | awk '{print $1}' | paste -sd, -)
mkdir -p target/stress
log=target/stress/stress-$(date +%Y%m%d-%H%M%S).log
echo "# $(date -u) seed $seed ops $ops crash $crash fs-ops $fsops formats $formats" | tee -a "$log"
status=0
run() {
  set +e
  nice -n 10 "$bin/imgfs-stress" --imgfs "$bin/imgfs" "$@" 2>&1 | tee -a "$log" | grep -v ' ops$'
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    echo "imgfs-stress $* exited with status $rc" | tee -a "$log"
    status=1
  fi
}
for f in ${formats//,/ }; do
  run --formats "$f" --ops "$ops" --seed "$seed"
  if [ "$crash" -gt 0 ]; then
    run --formats "$f" --ops 1000 --crash "$crash" --seed "$((seed + 1))"
  fi
  if [ "$fsops" -gt 0 ]; then
    run --fs --formats "$f" --ops "$fsops" --seed "$((seed + 2))"
  fi
done
echo "# log: $log" >&2
exit $status
