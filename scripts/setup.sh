#!/usr/bin/env bash
# Fresh machine -> imgfs built, installed, and shown working on a sample qcow2 image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release
bash scripts/install.sh

demo=${IMGFS_DEMO_DIR:-/tmp/imgfs-demo}
mkdir -p "$demo/mnt"
imgfs umount "$demo/mnt" 2>/dev/null || true
rm -f "$demo/disk.qcow2"
qemu-img create -q -f qcow2 "$demo/disk.qcow2" 256M
imgfs mount "$demo/disk.qcow2" "$demo/mnt"
echo "== mounted: $(ls -l "$demo/mnt")"
printf 'label: gpt\nsize=128M, type=linux\ntype=linux\n' | sfdisk --quiet "$demo/mnt/disk.raw"
fdisk -l "$demo/mnt/disk.raw"
imgfs umount "$demo/mnt"
echo "== after umount:"
qemu-img check "$demo/disk.qcow2"
imgfs info "$demo/disk.qcow2"
