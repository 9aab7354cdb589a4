#!/usr/bin/env bash
# The main job, end to end (run as root: loop devices and mount need it):
# installs what is needed, creates a sample QED image, mounts it with imgmount,
# makes an ext4 file system on the raw file through a loop device, writes a file,
# unmounts everything cleanly and shows that the image is clean. Idempotent:
# each run starts from a fresh image under ${IMGMOUNT_DEMO_DIR:-/tmp/imgmount-demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

work=${IMGMOUNT_DEMO_DIR:-/tmp/imgmount-demo}
image=$work/disk.qed
mnt=$work/mnt
fs=$work/fs
loop=""

cleanup() {
  mountpoint -q "$fs" 2>/dev/null && umount "$fs" || true
  [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
  mountpoint -q "$mnt" 2>/dev/null && bin/imgmount unmount "$mnt" || true
}
trap cleanup EXIT

cleanup
mkdir -p "$work" "$mnt" "$fs"
rm -f "$image"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step bin/imgmount create -f qed "$image" 1G
step bin/imgmount "$image" "$mnt"
step ls -l "$mnt"
loop=$(losetup -f --show "$mnt/disk.raw")
echo "loop device: $loop"
step mkfs.ext4 -q -L imgmount-demo "$loop"
step mount "$loop" "$fs"
echo "hello from imgmount, $(date -u)" > "$fs/hello.txt"
step cat "$fs/hello.txt"
step umount "$fs"
step losetup -d "$loop"
loop=""
step bin/imgmount unmount "$mnt"
step bin/imgmount check "$image"
step bin/imgmount info "$image"
dirty=$(bin/imgmount info --output=json "$image" | node -e 'process.stdin.on("data",d=>process.stdout.write(String(JSON.parse(d)["dirty-flag"])))')
if [ "$dirty" != "false" ]; then
  echo "demo: FAILED: the image is still marked dirty" >&2
  exit 1
fi
echo
echo "demo: OK: $image was written through FUSE, unmounted cleanly, and is consistent (need-check clear)"
