#!/usr/bin/env bash
# Install the Debian packages imgfs and its tests need (idempotent; apt-get only when something is missing).
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img      || need+=(qemu-utils)
have qemu-storage-daemon || need+=(qemu-utils)
have fusermount3   || need+=(fuse3)
have sfdisk        || need+=(fdisk)
have fio           || need+=(fio)
have vhdiinfo      || need+=(libvhdi-utils)
have mkfs.ext4     || need+=(e2fsprogs)
have losetup       || need+=(mount)
have getfattr      || need+=(attr)
have runuser       || need+=(util-linux)   # tests/nonroot.rs runs imgfs as a user
have useradd       || need+=(passwd)       # ... and creates that user
have cc            || need+=(gcc)
have make          || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# FUSE needs its device node and module.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
