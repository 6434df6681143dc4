#!/usr/bin/env bash
# Side-by-side benchmark: imgfs vs qemu-storage-daemon's FUSE export on the same images, interleaved A/B,
# median of N repeats, plus the host-file O_DIRECT limit, mount-to-first-read and exit times for 16 TiB
# images, and daemon peak RSS. Usage: scripts/bench.sh [--quick] [FORMAT...]   (default: raw qcow2 vhdx qed)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
formats=()
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    *) formats+=("$a") ;;
  esac
done
# raw-pt: the raw images again, served by imgfs with FUSE passthrough (qsd has no such mode).
[ ${#formats[@]} -gt 0 ] || formats=(raw raw-pt qcow2 vhdx qed)
size=${BENCH_SIZE:-4G}
reps=${BENCH_REPS:-3}
runtime=${BENCH_RUNTIME:-3}
if [ $quick = 1 ]; then size=1G; reps=1; runtime=2; fi
work=${BENCH_DIR:-/var/tmp/imgfs-bench}
bash scripts/install-deps.sh
cargo build --release -q
imgfs="$root/target/release/imgfs"
mkdir -p "$work"
results="$work/results.tsv"
: > "$results"

log() { printf '%s\n' "$*" >&2; }

# Never leave a mount or a daemon behind, whatever fails.
cleanup() {
  "$imgfs" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  [ -f "$work/qsd.pid" ] && kill "$(cat "$work/qsd.pid")" 2>/dev/null || true
  umount -l "$work/qsd.export" 2>/dev/null || true
}
trap cleanup EXIT

# Drop an image's pages from the host page cache, so overwrite cases start cold.
evict() { python3 -c 'import os,sys
for p in sys.argv[1:]:
    fd=os.open(p,os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)' "$@"; }

# --- images -------------------------------------------------------------------------------------------
seed="$work/seed.raw"
if [ ! -f "$seed" ] || [ "$(stat -c %s "$seed")" != "$(numfmt --from=iec "$size")" ]; then
  log "making $size of random data"
  head -c "$(numfmt --from=iec "$size")" /dev/urandom > "$seed"
fi
make_images() {  # $1=format -> $work/full.$1 (fully allocated, random) and a fresh empty.$1 per use
  local f=${1%-pt}
  if [ ! "$work/full.$f" -nt "$seed" ]; then
    log "converting full image to $f"
    case $f in
      raw) cp --sparse=never "$seed" "$work/full.raw" ;;
      *) qemu-img convert -O "$f" "$seed" "$work/full.$f" ;;
    esac
  fi
}
new_empty() {  # $1=format -> path of a fresh empty image
  local f=${1%-pt}
  local p="$work/empty.$f"
  rm -f "$p"
  case $f in
    raw) truncate -s "$size" "$p" ;;
    *) qemu-img create -q -f "$f" "$p" "$size" ;;
  esac
  echo "$p"
}

# --- servers -------------------------------------------------------------------------------------------
# start_server imgfs|qsd FORMAT IMAGE -> prints the exposed file; sets $server_pid
start_server() {
  local kind=$1 fmt=${2%-pt} img=$3 extra=()
  [ "$2" = raw-pt ] && extra=(--passthrough)
  if [ "$kind" = imgfs ]; then
    mkdir -p "$work/mnt"
    "$imgfs" mount "${extra[@]}" --format "$fmt" "$img" "$work/mnt"
    server_pid=$(getfattr --absolute-names --only-values -n user.imgfs.pid "$work/mnt")
    exposed="$work/mnt/$(basename "${img%.*}").raw"
  else
    exposed="$work/qsd.export"
    : > "$exposed"
    qemu-storage-daemon \
      --blockdev driver=file,node-name=file0,filename="$img",cache.direct=off \
      --blockdev driver="$fmt",node-name=fmt0,file=file0 \
      --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$exposed",writable=on \
      --pidfile "$work/qsd.pid" --daemonize
    server_pid=$(cat "$work/qsd.pid")
  fi
}
stop_server() {
  local kind=$1
  if [ "$kind" = imgfs ]; then
    "$imgfs" umount "$work/mnt"
  else
    kill "$server_pid"
    while kill -0 "$server_pid" 2>/dev/null; do sleep 0.02; done
  fi
}
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# --- fio -----------------------------------------------------------------------------------------------
# run_fio NAME FILE RW BS JOBS -> prints MB/s and IOPS
run_fio() {
  local name=$1 file=$2 rw=$3 bs=$4 jobs=$5
  fio --name="$name" --filename="$file" --rw="$rw" --bs="$bs" --numjobs="$jobs" --ioengine=psync \
      --iodepth=1 --direct=1 --time_based --runtime="$runtime" --size="$size" --group_reporting \
      --randrepeat=0 --norandommap --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
j=json.load(sys.stdin)["jobs"][0]
bw=(j["read"]["bw_bytes"]+j["write"]["bw_bytes"])/1e6
iops=j["read"]["iops"]+j["write"]["iops"]
print(f"{bw:.1f}\t{iops:.0f}")'
}

cases=(
  "seqread|read|1M|1|full"
  "seqwrite-alloc|write|1M|1|empty"
  "seqwrite-over|write|1M|1|full"
  "randread|randread|4k|4|full"
  "randwrite-alloc|randwrite|4k|1|empty"
  "randwrite-over|randwrite|4k|1|full"
)

for fmt in "${formats[@]}"; do
  make_images "$fmt"
  for c in "${cases[@]}"; do
    IFS='|' read -r name rw bs jobs which <<<"$c"
    for rep in $(seq 1 "$reps"); do
      for kind in imgfs qsd; do
        if [ "$which" = full ]; then img="$work/full.${fmt%-pt}"; else img=$(new_empty "$fmt"); fi
        # Overwrite cases start with the image out of the host page cache; read cases may find it there.
        [ "$which" = full ] && [[ "$rw" == *write ]] && evict "$img"
        start_server "$kind" "$fmt" "$img"
        out=$(run_fio "$name" "$exposed" "$rw" "$bs" "$jobs")
        rss=$(peak_rss_kib "$server_pid")
        stop_server "$kind"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$fmt" "$name" "$kind" "$rep" "$out" "$rss" >> "$results"
        log "$fmt $name $kind #$rep: $out (rss ${rss} KiB)"
      done
    done
  done
done

# Host-file limit: the same jobs straight on a raw file with O_DIRECT.
cp --sparse=never "$seed" "$work/host.raw" 2>/dev/null || true
for c in "${cases[@]}"; do
  IFS='|' read -r name rw bs jobs which <<<"$c"
  for rep in $(seq 1 "$reps"); do
    out=$(run_fio "$name" "$work/host.raw" "$rw" "$bs" "$jobs")
    printf 'host\t%s\thost\t%s\t%s\t0\n' "$name" "$rep" "$out" >> "$results"
  done
done

# Mount-to-first-read and exit time for 16 TiB images.
startup="$work/startup.tsv"
: > "$startup"
for fmt in qcow2 vhdx; do
  [[ " ${formats[*]} " == *" $fmt "* ]] || continue
  big="$work/big16t.$fmt"
  rm -f "$big"
  qemu-img create -q -f "$fmt" "$big" 16T
  for rep in $(seq 1 "$reps"); do
    mkdir -p "$work/mnt"
    t0=$(date +%s%N)
    "$imgfs" mount "$big" "$work/mnt"
    dd if="$work/mnt/big16t.raw" of=/dev/null bs=1M count=1 iflag=direct status=none
    t1=$(date +%s%N)
    pid=$(getfattr --absolute-names --only-values -n user.imgfs.pid "$work/mnt")
    rss=$(peak_rss_kib "$pid")
    "$imgfs" umount "$work/mnt"
    t2=$(date +%s%N)
    printf '%s\t%s\t%s\t%s\n' "$fmt" "$(( (t1-t0)/1000000 ))" "$(( (t2-t1)/1000000 ))" "$rss" >> "$startup"
  done
done

python3 "$root/scripts/bench_report.py" "$results" "$startup"
