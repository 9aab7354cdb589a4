#!/usr/bin/env bash
# Installs what imgmount and its tests need on Debian/Ubuntu: fuse3 (fusermount3,
# for ordinary users' mounts and for unmounting), qemu-utils (the oracle: qemu-img, qemu-io),
# e2fsprogs (mkfs.ext4, e2fsck), util-linux (losetup), fio (the soak test,
# scripts/soak.sh, and the benchmark), build-essential and
# python3 (node-gyp builds the native addon, native/imgmount.c: a C compiler,
# g++ as gyp's linker, make, the libc and kernel headers), then the npm
# packages, and builds; also the tools the format tests make or read images with where
# qemu-img 7.2 cannot (listed below). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(util-linux)
command -v fio >/dev/null || need+=(fio)
{ command -v gcc && command -v g++ && command -v make && [ -f /usr/include/linux/fuse.h ]; } >/dev/null || need+=(build-essential)
command -v python3 >/dev/null || need+=(python3)
# What the format tests make images with, or compare with, where qemu-img 7.2 cannot
# (bochs, cloop, DMG, differencing VHD and VHDX): bximage, create_compressed_fs, dmg2img
# and bzip2 (test/helpers/dmg-writer.ts), vhdiinfo/vhdimount and libvhdi's Python module.
command -v bximage >/dev/null || need+=(bximage)
command -v create_compressed_fs >/dev/null || need+=(cloop-utils)
command -v dmg2img >/dev/null || need+=(dmg2img)
command -v bzip2 >/dev/null || need+=(bzip2)
command -v vhdimount >/dev/null || need+=(libvhdi-utils)
/usr/bin/python3 -c 'import pyvhdi' 2>/dev/null || need+=(python3-libvhdi)
if [ "${IMGMOUNT_BENCH_DEPS:-0}" = 1 ]; then
  command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

stamp=node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent build
