#!/usr/bin/env bash
# Benchmark: imgmount's FUSE mount against qemu-storage-daemon's FUSE export
# (the peer to beat), in the same run, on the same kind of image, with fio.
# Needs root, fio and qemu-storage-daemon (IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh).
# Usage: scripts/bench.sh [SIZE_MB] [WORKDIR]    (default 1024 MB under /var/tmp)
# Prints one table: MB/s for sequential write/read and IOPS for 4 KiB random
# read/write with 4 jobs; each cell is the median of three runs.
set -euo pipefail
cd "$(dirname "$0")/.."
IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh >/dev/null

size_mb=${1:-1024}
work=${2:-/var/tmp/imgmount-bench}
rm -rf "$work" && mkdir -p "$work"
qsd_pid=""
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && bin/imgmount unmount "$work/mnt" >/dev/null 2>&1 || true
  [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null || true
}
trap cleanup EXIT

# fio_job NAME FILE RW BS JOBS -> prints MB/s (bw) or IOPS
fio_job() {
  local file=$1 rw=$2 bs=$3 jobs=$4 metric=$5 extra=()
  [ "$rw" = write ] && extra=(--fsync_on_close=1)
  fio --name=bench --filename="$file" --rw="$rw" --bs="$bs" --size="${size_mb}M" --numjobs="$jobs" \
    --ioengine=psync --direct=1 --group_reporting --output-format=json \
    $( [ "$rw" = randread ] || [ "$rw" = randwrite ] && echo --runtime=8 --time_based ) "${extra[@]}" 2>/dev/null |
    node -e '
      let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
        const j = JSON.parse(s).jobs[0]; const side = j.write.io_bytes > 0 ? j.write : j.read;
        console.log(process.argv[1] === "iops" ? Math.round(side.iops) : (side.bw_bytes / 1e6).toFixed(0));
      });' "$metric"
}

median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }

measure() { # measure FILE IMAGE -> "seqwrite seqread randread randwrite"
  local file=$1 image=$2 a b c
  local sw sr rr rw
  a=$(fio_job "$file" write 128k 1 mb); b=$(fio_job "$file" write 128k 1 mb); c=$(fio_job "$file" write 128k 1 mb); sw=$(median3 "$a" "$b" "$c")
  a=$(fio_job "$file" read 128k 1 mb); b=$(fio_job "$file" read 128k 1 mb); c=$(fio_job "$file" read 128k 1 mb); sr=$(median3 "$a" "$b" "$c")
  cat "$image" >/dev/null # the host page cache of this machine drops pages quickly: warm it for both peers alike
  a=$(fio_job "$file" randread 4k 4 iops); b=$(fio_job "$file" randread 4k 4 iops); c=$(fio_job "$file" randread 4k 4 iops); rr=$(median3 "$a" "$b" "$c")
  a=$(fio_job "$file" randwrite 4k 4 iops); b=$(fio_job "$file" randwrite 4k 4 iops); c=$(fio_job "$file" randwrite 4k 4 iops); rw=$(median3 "$a" "$b" "$c")
  echo "$sw $sr $rr $rw"
}

buffered_reread() { # second buffered read of the whole file with dd, MB/s
  dd if="$1" of=/dev/null bs=1M 2>/dev/null
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { t = $(i-1) } } /copied/ { printf "%.0f\n", $1 / t / 1e6 }'
}

# imgmount
qemu-img create -q -f qed "$work/a.qed" "${size_mb}M"
mkdir -p "$work/mnt"
bin/imgmount "$work/a.qed" "$work/mnt"
first_write_ours=$(fio_job "$work/mnt/a.raw" write 128k 1 mb)
ours=$(measure "$work/mnt/a.raw" "$work/a.qed")
reread_ours=$(buffered_reread "$work/mnt/a.raw")
bin/imgmount unmount "$work/mnt"

# qemu-storage-daemon
qemu-img create -q -f qed "$work/b.qed" "${size_mb}M"
touch "$work/b.raw"
qemu-storage-daemon --blockdev driver=file,node-name=file0,filename="$work/b.qed" \
  --blockdev driver=qed,node-name=fmt0,file=file0 \
  --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$work/b.raw",writable=on >"$work/qsd.log" 2>&1 &
qsd_pid=$!
for _ in $(seq 50); do [ "$(stat -c %s "$work/b.raw")" -gt 0 ] && break; sleep 0.1; done
first_write_qsd=$(fio_job "$work/b.raw" write 128k 1 mb)
theirs=$(measure "$work/b.raw" "$work/b.qed")
reread_qsd=$(buffered_reread "$work/b.raw")
kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=""

read -r sw sr rr rw <<<"$ours"
read -r qsw qsr qrr qrw <<<"$theirs"
printf '\n%-34s %12s %22s\n' "fio, ${size_mb} MiB QED image, O_DIRECT" "imgmount" "qemu-storage-daemon"
printf '%-34s %12s %22s\n' "allocating write 128k (MB/s)" "$first_write_ours" "$first_write_qsd"
printf '%-34s %12s %22s\n' "rewrite 128k (MB/s)" "$sw" "$qsw"
printf '%-34s %12s %22s\n' "sequential read 128k (MB/s)" "$sr" "$qsr"
printf '%-34s %12s %22s\n' "random read 4k, 4 jobs (IOPS)" "$rr" "$qrr"
printf '%-34s %12s %22s\n' "random write 4k, 4 jobs (IOPS)" "$rw" "$qrw"
printf '%-34s %12s %22s\n' "buffered re-read, dd (MB/s)" "$reread_ours" "$reread_qsd"
