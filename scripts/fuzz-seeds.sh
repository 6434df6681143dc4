#!/usr/bin/env bash
# Seed corpora for the cargo-fuzz targets: small images of each format made by qemu-img.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 65536 /dev/urandom > "$tmp/data"
for fmt in qcow2 qed qcow vhdx; do
  dir=corpus/open_$fmt
  mkdir -p "$dir"
  i=0
  for opts in "" "cluster_size=4096" "cluster_size=512" "lazy_refcounts=on" "extended_l2=on" "table_size=1" "block_size=1M" "compat=0.10"; do
    img="$tmp/s$i.$fmt"
    qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$img" 1M 2>/dev/null || continue
    qemu-io -f "$fmt" -c "write -s $tmp/data 4096 65536" -c "write -z 512k 4096" "$img" >/dev/null 2>&1 || true
    cp "$img" "$dir/seed$i"
    i=$((i + 1))
  done
  echo "$dir: $i seeds"
done
# VMDK: sparse extents (plain, zeroed-grain, streamOptimized) and descriptors (split, flat).
mkdir -p corpus/open_vmdk corpus/vmdk_descriptor
qemu-img create -q -f vmdk "$tmp/v.vmdk" 1M
qemu-io -f vmdk -c "write -s $tmp/data 4096 65536" "$tmp/v.vmdk" >/dev/null
cp "$tmp/v.vmdk" corpus/open_vmdk/seed0
qemu-img create -q -f vmdk -o zeroed_grain=on "$tmp/z.vmdk" 1M
qemu-io -f vmdk -c "write -s $tmp/data 0 65536" -c "write -z 512k 65536" "$tmp/z.vmdk" >/dev/null
cp "$tmp/z.vmdk" corpus/open_vmdk/seed1
qemu-img convert -O vmdk -o subformat=streamOptimized "$tmp/v.vmdk" corpus/open_vmdk/seed2
for sub in twoGbMaxExtentSparse monolithicFlat twoGbMaxExtentFlat; do
  qemu-img create -q -f vmdk -o subformat=$sub "$tmp/$sub.vmdk" 3G
  cp "$tmp/$sub.vmdk" corpus/vmdk_descriptor/$sub
done
printf '<Envelope/>' > "$tmp/a.ovf"
cp corpus/open_vmdk/seed2 "$tmp/disk.vmdk"
tar --format=ustar -C "$tmp" -cf corpus/vmdk_descriptor/ova a.ovf disk.vmdk
echo "corpus/open_vmdk: 3 seeds; corpus/vmdk_descriptor: 4 seeds"
