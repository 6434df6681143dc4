#!/usr/bin/env bash
# Install a built imgfs: the binary, the mount(8) helper, the systemd template unit and the docs.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-/usr/local}
install -D -m 0755 target/release/imgfs "$prefix/bin/imgfs"
# mount -t fuse.imgfs (and fstab lines of that type) run /sbin/mount.fuse.imgfs.
ln -sf "$prefix/bin/imgfs" /sbin/mount.fuse.imgfs
ln -sf "$prefix/bin/imgfs" /sbin/mount.imgfs
if [ -d /etc/systemd/system ]; then
  install -D -m 0644 systemd/imgfs@.service /etc/systemd/system/imgfs@.service
  mkdir -p /etc/imgfs
  systemctl daemon-reload 2>/dev/null || true
fi
install -D -m 0644 README.md "$prefix/share/doc/imgfs/README.md"
if [ -d docs ]; then
  cp -r docs/. "$prefix/share/doc/imgfs/"
fi
echo "installed $prefix/bin/imgfs, /sbin/mount.fuse.imgfs, imgfs@.service"
