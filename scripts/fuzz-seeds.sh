#!/usr/bin/env bash
# Seed corpora for the cargo-fuzz targets: small real images of every subformat, made by qemu-img,
# qemu-io and imgfs create. Images are kept small (512-byte or 4 KiB clusters, a few KiB of data)
# because libFuzzer's cost per execution grows with the input size.
#
# open_vhdx takes a sparse encoding (fuzz/fuzz_targets/common.rs: records of a 2-byte 4 KiB block
# index and 4 KiB of bytes) because a VHDX file is 4-8 MiB with only a handful of non-zero blocks:
# the seeds hold just those blocks (~30 KiB instead of 8 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
imgfs=${IMGFS:-target/release/imgfs}
[ -x "$imgfs" ] || cargo build --release --bin imgfs >&2
imgfs=$(realpath "$imgfs")
cd fuzz
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -c 16384 /dev/urandom > "$tmp/data"
fill() { # fill FMT IMG: a little data, a zero range and (where the format has them) compressed clusters
  qemu-io -f "$1" -c "write -s $tmp/data 4096 8192" -c "write -z 65536 4096" "$2" >/dev/null 2>&1 || true
}
i=0
add() { # add TARGET FILE
  mkdir -p "corpus/$1"
  cp "$2" "corpus/$1/seed$i"
  i=$((i + 1))
}
# qcow2: v2/v3, cluster sizes, refcount widths, lazy refcounts, subclusters, zlib/zstd compressed
# clusters, an internal snapshot, bitmaps, a backing file name, an external data file.
for opts in "compat=0.10,cluster_size=512" "cluster_size=512" "cluster_size=4096" "cluster_size=4096,refcount_bits=1" \
            "cluster_size=4096,refcount_bits=64" "cluster_size=4096,lazy_refcounts=on" "cluster_size=16k,extended_l2=on" \
            "cluster_size=4096,compression_type=zstd" "cluster_size=65536"; do
  img="$tmp/q.qcow2"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 1M
  fill qcow2 "$img"
  qemu-io -f qcow2 -c "write -c -s $tmp/data 131072 65536" "$img" >/dev/null 2>&1 || true
  add open_qcow2 "$img"
done
img="$tmp/q.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 1M
fill qcow2 "$img"
qemu-img snapshot -c s1 "$img"
qemu-io -f qcow2 -c "write -s $tmp/data 4096 4096" "$img" >/dev/null
qemu-img bitmap --add "$img" b1
add open_qcow2 "$img"
qemu-img create -q -f qcow2 -o cluster_size=4096 -b q.qcow2 -F qcow2 "$tmp/child.qcow2" 1M
add open_qcow2 "$tmp/child.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096,data_file="$tmp/ext.raw" "$tmp/ext.qcow2" 1M
add open_qcow2 "$tmp/ext.qcow2"
echo "corpus/open_qcow2: $(ls corpus/open_qcow2 | wc -l) seeds"
# QED: cluster and table sizes, a backing file name.
for opts in "cluster_size=4096" "cluster_size=4096,table_size=1" "cluster_size=65536"; do
  img="$tmp/e.qed"
  qemu-img create -q -f qed -o "$opts" "$img" 1M
  fill qed "$img"
  add open_qed "$img"
done
truncate -s 1M "$tmp/base.raw"
qemu-img create -q -f qed -o cluster_size=4096 -b base.raw -F raw "$tmp/c.qed" 1M
fill qed "$tmp/c.qed"
add open_qed "$tmp/c.qed"
echo "corpus/open_qed: $(ls corpus/open_qed | wc -l) seeds"
# qcow v1: plain, compressed clusters, a backing file name.
qemu-img create -q -f qcow "$tmp/p.qcow" 1M
fill qcow "$tmp/p.qcow"
add open_qcow "$tmp/p.qcow"
qemu-img convert -c -f qcow -O qcow "$tmp/p.qcow" "$tmp/z.qcow" 2>/dev/null || true
add open_qcow "$tmp/z.qcow"
qemu-img create -q -f qcow -b base.raw -F raw "$tmp/c.qcow" 1M
fill qcow "$tmp/c.qcow"
add open_qcow "$tmp/c.qcow"
echo "corpus/open_qcow: $(ls corpus/open_qcow | wc -l) seeds"
# VHDX: dynamic, fixed, 4096-byte sectors, differencing (sector bitmaps), a larger block size.
sparse() { # sparse IMG OUT: the non-zero 4 KiB blocks as (u16 LE index, 4 KiB) records
  python3 - "$1" "$2" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
out = bytearray()
for i in range(0, len(d), 4096):
    blk = d[i:i + 4096]
    if any(blk) or i + 4096 >= len(d):  # the last block too: it sets the file length
        out += struct.pack('<H', i // 4096) + blk.ljust(4096, b'\0')
open(sys.argv[2], 'wb').write(out)
PY
}
vx() { # vx IMG: add the sparse form of IMG to open_vhdx
  sparse "$1" "$tmp/sparse"
  add open_vhdx "$tmp/sparse"
}
qemu-img create -q -f vhdx -o block_size=1M "$tmp/d.vhdx" 1M; fill vhdx "$tmp/d.vhdx"; vx "$tmp/d.vhdx"
qemu-img create -q -f vhdx -o block_size=8M,log_size=1M "$tmp/b.vhdx" 4M; fill vhdx "$tmp/b.vhdx"; vx "$tmp/b.vhdx"
qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M "$tmp/f.vhdx" 1M; vx "$tmp/f.vhdx"
"$imgfs" create -f vhdx -o logical_sector_size=4096,block_size=1M "$tmp/k.vhdx" 1M >/dev/null; vx "$tmp/k.vhdx"
cp "$tmp/d.vhdx" "$tmp/parent.vhdx"
"$imgfs" create -f vhdx -b parent.vhdx "$tmp/diff.vhdx" >/dev/null
mkdir -p "$tmp/m"
"$imgfs" mount "$tmp/diff.vhdx" "$tmp/m" && { dd if="$tmp/data" of="$tmp/m/diff.raw" bs=512 seek=3 count=5 conv=notrunc,fsync status=none; "$imgfs" umount "$tmp/m"; }
vx "$tmp/diff.vhdx"
echo "corpus/open_vhdx: $(ls corpus/open_vhdx | wc -l) seeds"
# VHD (vpc) and VDI: dynamic, fixed/static, force_size.
for fmt in vpc vdi; do
  for opts in "" "subformat=fixed" "force_size=on" "static=on"; do
    img="$tmp/v.$fmt"
    rm -f "$img"
    qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$img" 1M 2>/dev/null || continue
    fill "$fmt" "$img"
    add "open_$fmt" "$img"
  done
  echo "corpus/open_$fmt: $(ls corpus/open_$fmt | wc -l) seeds"
done
# Partition tables: 256 KiB disks partitioned by sfdisk (MBR with a chain of logicals, GPT).
for script in \
  'label: dos\nstart=34,size=60,type=83\nstart=100,size=400,type=5\nstart=102,size=20\nstart=130,size=20\nstart=160,size=20\n' \
  'label: gpt\nstart=40,size=100,name=a\nstart=140,size=100,name=b\n'; do
  truncate -s 256K "$tmp/p$i"
  printf "$script" | sfdisk -q "$tmp/p$i" >/dev/null
  add partition_table "$tmp/p$i"
done
echo "corpus/partition_table: $(ls corpus/partition_table | wc -l) seeds"
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
# ESX delta extents (qemu-img cannot make them): COWD with 512-byte and 4 KiB grains, seSparse with
# every grain entry type. The open_vmdk target opens them through a descriptor it writes itself.
python3 - corpus/open_vmdk <<'PY'
import struct, sys
out = sys.argv[1]
def cowd(grain, name):
    sectors, gt_sectors = 2048, 4096 * 4 // 512
    gd, gt = 4, 5
    grains = gt + gt_sectors
    b = bytearray(grains * 512)
    b[:32] = b'COWD' + struct.pack('<7I', 1, 3, sectors, grain, gd, 2, 0)
    struct.pack_into('<I', b, gd * 512, gt)
    nxt = grains
    for j in (0, 1, 2, 9, 40, 41):  # some runs contiguous on disk, some not
        struct.pack_into('<I', b, gt * 512 + j * 4, nxt)
        b += bytes([j + 1]) * (grain * 512)
        nxt += grain
    struct.pack_into('<I', b, 28, nxt)
    open(f'{out}/{name}', 'wb').write(b)
cowd(1, 'cowd1')
cowd(8, 'cowd8')
gd, gts, grains = 2, 3, 3 + 64
b = bytearray(grains * 512)
struct.pack_into('<26Q', b, 0, 0xcafebabe, 0x200000001, 2048, 8, 64, 0, 0, 0, 0, 0,
                 1, 1, 0, 0, 0, 0, gd, 1, gts, 64, 0, 0, 0, 0, grains, 64)
struct.pack_into('<4Q', b, 512, 0xcafecafe, 1, 1, 0)
struct.pack_into('<Q', b, gd * 512, 0x1000000000000000)
entries = [0x3000000000000000, 0x3001000000000000, 0, 0x2000000000000000, 0x1000000000000000,
           0x3002000000000000, 0x3007000000000000]
for j, e in enumerate(entries):
    struct.pack_into('<Q', b, gts * 512 + j * 8, e)
for n in range(8):
    b += bytes([n + 1]) * 4096
open(f'{out}/sesparse', 'wb').write(b)
PY
echo "corpus/open_vmdk: 6 seeds; corpus/vmdk_descriptor: 4 seeds"
