#!/usr/bin/env bash
# Seed corpora for the cargo-fuzz targets: small images of each format made by qemu-img.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 65536 /dev/urandom > "$tmp/data"
for fmt in qcow2 qed qcow vhdx vpc vdi; do
  dir=corpus/open_$fmt
  mkdir -p "$dir"
  i=0
  for opts in "" "cluster_size=4096" "cluster_size=512" "lazy_refcounts=on" "extended_l2=on" "table_size=1" "block_size=1M" "compat=0.10" "subformat=fixed" "force_size=on" "static=on"; do
    img="$tmp/s$i.$fmt"
    qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$img" 1M 2>/dev/null || continue
    qemu-io -f "$fmt" -c "write -s $tmp/data 4096 65536" -c "write -z 512k 4096" "$img" >/dev/null 2>&1 || true
    cp "$img" "$dir/seed$i"
    i=$((i + 1))
  done
  echo "$dir: $i seeds"
done
# Partition tables: 256 KiB disks partitioned by sfdisk (MBR with a chain of logicals, GPT).
dir=corpus/partition_table
mkdir -p "$dir"
i=0
for script in \
  'label: dos\nstart=34,size=60,type=83\nstart=100,size=400,type=5\nstart=102,size=20\nstart=130,size=20\nstart=160,size=20\n' \
  'label: gpt\nstart=40,size=100,name=a\nstart=140,size=100,name=b\n'; do
  truncate -s 256K "$tmp/p$i"
  printf "$script" | sfdisk -q "$tmp/p$i" >/dev/null
  cp "$tmp/p$i" "$dir/seed$i"
  i=$((i + 1))
done
echo "$dir: $i seeds"
