#!/usr/bin/env bash
# Side-by-side benchmark: imgfs vs qemu-storage-daemon's FUSE export on the same images, interleaved A/B,
# median of N repeats, plus the host-file O_DIRECT limit, mount-to-first-read and exit times for 16 TiB
# images, and daemon peak RSS. Usage: scripts/bench.sh [--quick] [FORMAT...]   (default: raw qcow2 vhdx qed vmdk vpc vdi;
# add raw-pt for raw images served with FUSE passthrough). The fio jobs are scripts/fio/*.fio;
# BENCH_CASES, BENCH_REPS, BENCH_SIZE, BENCH_RUNTIME and BENCH_DIR override the defaults;
# BENCH_HOSTBUF=1 adds the buffered host-file probe to sequential-write cases.
# The "mixed" case (BENCH_CASES=mixed) runs 4 random readers with and without one fsyncing writer
# and reports the readers' IOPS and p99 latency; BENCH_BASELINE=/path/to/another/imgfs adds that
# binary as a third server, interleaved with the others (e.g. an older build, for before/after).
# BENCH_TRANSPORTS="uring dev" runs imgfs once per request transport (default: auto, i.e. io_uring
# where the kernel offers it; as root the bench turns the kernel's switch on for uring).
# BENCH_QSD11=DIR also runs qemu-storage-daemon 11 with 2 iothreads from a side tree DIR (see
# docs/performance.md for the mmdebstrap recipe).
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
# raw-pt (on request): the raw images again, served by imgfs with FUSE passthrough (qsd has none).
[ ${#formats[@]} -gt 0 ] || formats=(raw qcow2 vhdx qed vmdk vpc vdi)
size=${BENCH_SIZE:-4G}
reps=${BENCH_REPS:-3}
runtime=${BENCH_RUNTIME:-2}
if [ $quick = 1 ]; then size=1G; reps=1; runtime=2; fi
work=${BENCH_DIR:-/var/tmp/imgfs-bench}
bash scripts/install-deps.sh
cargo build --release -q
imgfs="$root/target/release/imgfs"
baseline=${BENCH_BASELINE:-}
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
read -r -a transports <<< "${BENCH_TRANSPORTS:-auto}"
imgfs_kinds=()
for t in "${transports[@]}"; do
  if [ "$t" = auto ]; then imgfs_kinds+=(imgfs); else imgfs_kinds+=("imgfs-$t"); fi
  if [ "$t" != dev ] && [ "$(id -u)" = 0 ] && [ -f /sys/module/fuse/parameters/enable_uring ]; then
    echo Y > /sys/module/fuse/parameters/enable_uring
  fi
done
qsd11=${BENCH_QSD11:-}
if [ -n "$qsd11" ] && [ ! -x "$qsd11/usr/bin/qemu-storage-daemon" ]; then
  echo "BENCH_QSD11=$qsd11: no usr/bin/qemu-storage-daemon there (see docs/performance.md)" >&2
  exit 1
fi
# qemu-storage-daemon 11 from the side tree, through its own dynamic loader and libraries.
qsd11_cmd() {
  QEMU_MODULE_DIR="$qsd11/usr/lib/x86_64-linux-gnu/qemu" "$qsd11/lib64/ld-linux-x86-64.so.2" \
    --library-path "$qsd11/usr/lib/x86_64-linux-gnu:$qsd11/lib/x86_64-linux-gnu" \
    "$qsd11/usr/bin/qemu-storage-daemon" "$@"
}
trap cleanup EXIT

# Read an image into the host page cache, so read cases measure the servers, not the disk.
warm() { cat "$@" > /dev/null; }
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
  if [[ $kind == imgfs* ]] || [ "$kind" = baseline ]; then
    local bin=$imgfs
    [ "$kind" = baseline ] && bin=$baseline
    if [[ $kind == imgfs-* ]]; then extra+=(--transport "${kind#imgfs-}"); fi
    mkdir -p "$work/mnt"
    "$bin" mount "${extra[@]}" --format "$fmt" "$img" "$work/mnt"
    server_pid=$(getfattr --absolute-names --only-values -n user.imgfs.pid "$work/mnt")
    exposed="$work/mnt/$(basename "${img%.*}").raw"
  else
    exposed="$work/qsd.export"
    : > "$exposed"
    local qsd=(qemu-storage-daemon) threads=() on=""
    if [ "$kind" = qsd11 ]; then
      qsd=(qsd11_cmd)
      threads=(--object iothread,id=iot0 --object iothread,id=iot1)
      on=",iothread.0=iot0,iothread.1=iot1"
    fi
    "${qsd[@]}" "${threads[@]}" \
      --blockdev driver=file,node-name=file0,filename="$img",cache.direct=off \
      --blockdev driver="$fmt",node-name=fmt0,file=file0 \
      --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$exposed",writable=on$on \
      --pidfile "$work/qsd.pid" --daemonize
    server_pid=$(cat "$work/qsd.pid")
  fi
}
stop_server() {  # $1=imgfs|qsd $2=image
  local kind=$1 img=$2
  if [[ $kind == imgfs* ]] || [ "$kind" = baseline ]; then
    "$imgfs" umount "$work/mnt"
  else
    kill "$server_pid"
    while kill -0 "$server_pid" 2>/dev/null; do sleep 0.02; done
    # qsd exits without waiting for the host to write its dirty pages back; do it here, as
    # `imgfs umount` does, so that writeback does not slow down the next run.
    sync -f "$img"
  fi
}
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# CPU time (user + system, clock ticks, all threads) a daemon has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# --- fio -----------------------------------------------------------------------------------------------
jobs="$root/scripts/fio"
# BENCH_CASES="seqwrite-over randread" runs a subset.
read -r -a cases <<< "${BENCH_CASES:-seqread seqwrite-alloc seqwrite-over randread randwrite-alloc randwrite-over}"
# run_fio CASE FILE [DIRECT] -> prints MB/s, IOPS and the number of I/Os (reads + writes)
run_fio() {
  FILE=$2 SIZE=$size RUNTIME=$runtime DIRECT=${3:-1} fio --output-format=json "$jobs/$1.fio" 2>/dev/null |
    python3 -c 'import json,sys
j=json.load(sys.stdin)["jobs"][0]
bw=(j["read"]["bw_bytes"]+j["write"]["bw_bytes"])/1e6
iops=j["read"]["iops"]+j["write"]["iops"]
ios=j["read"]["total_ios"]+j["write"]["total_ios"]
print(f"{bw:.1f}\t{iops:.0f}\t{ios}")'
}
image_kind() { sed -n 's/^# bench-image: //p' "$jobs/$1.fio"; }
# run_mixed FILE [--section=readers] -> prints the readers' IOPS and p99 completion latency (us)
run_mixed() {
  FILE=$1 SIZE=$size RUNTIME=$runtime fio --output-format=json ${2:-} "$jobs/mixed.fio" 2>/dev/null |
    python3 -c 'import json,sys
r=json.load(sys.stdin)["jobs"][0]["read"]
iops, p99 = r["iops"], r["clat_ns"]["percentile"]["99.000000"] / 1000
print(f"{iops:.0f}\t{p99:.0f}")'
}
mixed="$work/mixed.tsv"
: > "$mixed"

# The host-file limit runs on a fully allocated raw copy of the seed.
host_file() {
  [ "$(stat -c %s "$work/host.raw" 2>/dev/null)" = "$(stat -c %s "$seed")" ] ||
    cp --sparse=never "$seed" "$work/host.raw"
}

# host_buffered CASE full|empty -> the case run buffered on a plain host file (evicted, or new and sparse)
host_buffered() {
  local hb
  if [ "$2" = full ]; then
    hb="$work/host.raw"
    host_file
    evict "$hb"
  else
    hb="$work/empty-host.raw"
    rm -f "$hb"
    truncate -s "$size" "$hb"
  fi
  run_fio "$1" "$hb" 0
  sync -f "$hb"
}

t_start=$(date +%s)
for fmt in "${formats[@]}"; do
  make_images "$fmt"
  for name in "${cases[@]}"; do
    which=$(image_kind "$name")
    # Read cases and the mixed case (4 readers) find the image in the host page cache (for both
    # servers alike); the mixed case otherwise measured whatever of the image was still cached.
    [[ $name == *read || $name == mixed ]] && warm "$work/full.${fmt%-pt}"
    # With BENCH_HOSTBUF=1 sequential writes also run buffered on a plain host file, interleaved:
    # both servers write into the host page cache, and what that costs on this VM swings
    # several-fold from run to run, so this probe is the ceiling to read their numbers against.
    # (Off by default: it adds about a minute.)
    kinds=("${imgfs_kinds[@]}" qsd)
    [ -n "$qsd11" ] && kinds+=(qsd11)
    [ -n "$baseline" ] && kinds+=(baseline)
    [[ $name == seqwrite* ]] && [ "${BENCH_HOSTBUF:-0}" = 1 ] && kinds+=(hostbuf)
    if [ "$name" = mixed ]; then
      # Readers alone, then readers with the writer, on one mount; servers interleaved per rep.
      for rep in $(seq 1 "$reps"); do
        for kind in "${kinds[@]}"; do
          img="$work/full.${fmt%-pt}"
          start_server "$kind" "$fmt" "$img"
          alone=$(run_mixed "$exposed" --section=readers)
          both=$(run_mixed "$exposed")
          stop_server "$kind" "$img"
          printf '%s\t%s\t%s\t%s\t%s\n' "$fmt" "$kind" "$rep" "$alone" "$both" >> "$mixed"
          log "$fmt mixed $kind #$rep: readers alone $alone, with writer $both (IOPS, p99 us)"
        done
      done
      continue
    fi
    for rep in $(seq 1 "$reps"); do
      for kind in "${kinds[@]}"; do
        if [ "$kind" = hostbuf ]; then
          out=$(host_buffered "$name" "$which")
          printf '%s\t%s\thostbuf\t%s\t%s\t0\t0\n' "$fmt" "$name" "$rep" "$out" >> "$results"
          log "$fmt $name host buffered #$rep: $out"
          continue
        fi
        if [ "$which" = full ]; then img="$work/full.${fmt%-pt}"; else img=$(new_empty "$fmt"); fi
        # Overwrite cases start with the image out of the host page cache.
        [ "$which" = full ] && [[ $name == *write* ]] && evict "$img"
        start_server "$kind" "$fmt" "$img"
        c0=$(cpu_ticks "$server_pid")
        out=$(run_fio "$name" "$exposed")
        c1=$(cpu_ticks "$server_pid")
        rss=$(peak_rss_kib "$server_pid")
        stop_server "$kind" "$img"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fmt" "$name" "$kind" "$rep" "$out" "$rss" \
          "$((c1 - c0))" >> "$results"
        log "$fmt $name $kind #$rep: $out (rss ${rss} KiB, cpu $((c1 - c0)) ticks)"
      done
    done
  done
done

# Host-file limit: the same jobs straight on a raw file with O_DIRECT.
host_file
for name in "${cases[@]}"; do
  [ "$name" = mixed ] && continue
  for rep in $(seq 1 "$reps"); do
    out=$(run_fio "$name" "$work/host.raw")
    printf 'host\t%s\thost\t%s\t%s\t0\t0\n' "$name" "$rep" "$out" >> "$results"
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

log "fio cases took $(( $(date +%s) - t_start )) s"
[ -s "$results" ] && python3 "$root/scripts/bench_report.py" "$results" "$startup"
[ -s "$mixed" ] && python3 "$root/scripts/bench_report.py" --mixed "$mixed"
true
