#!/usr/bin/env bash
# Benchmark: imgmount's FUSE mount against qemu-storage-daemon's FUSE export
# (the peer to beat), in the same run, on the same kind of image, with fio.
# Needs root, fio and qemu-storage-daemon (IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh).
#
# Usage: [BENCH=qed,qcow2,compressed] scripts/bench.sh [SIZE_MB] [WORKDIR]
#   SIZE_MB   virtual size of every image (default 1024, or $SIZE_MB)
#   WORKDIR   scratch directory, emptied first (default /var/tmp/imgmount-bench)
#   BENCH     groups to run, comma-separated (default all three):
#     qed        read-write QED images: allocating write, rewrite, sequential read, 4k random
#                read/write with 4 jobs, buffered re-read
#     qcow2      a read-only qcow2 image converted from random data: sequential read 1M,
#                4k random read with 1 and 4 jobs
#     compressed read-only compressed qcow2 (half text, half random data; deflate, and zstd when
#                qemu-img supports it): sequential read 128k and 1M, 4k random read, 1 job
#   RAND_RUNTIME  seconds per random-I/O fio run (default 5)
#   BENCH_KEEP=1  keep the images and raw files in WORKDIR at the end (logs are always kept)
#
# Both peers are mounted at the same time (imgmount at WORKDIR/mnt-GROUP, qemu-storage-daemon
# exports at WORKDIR/qsd-GROUP/NAME.raw), and the three runs of every cell alternate between them
# (ours, theirs, ours, theirs, ours, theirs), since the machine is shared and noisy. A read-only
# group gives both peers the same image file. Every cell is the median of the three runs; ratio is
# imgmount / qemu-storage-daemon. fio uses psync with O_DIRECT on the mounted file. A run whose fio
# reports an error shows ERR, explained under the table. After the read-only groups, each peer's
# mounted file is compared with the raw data the image was made from.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-${SIZE_MB:-1024}}
work=${2:-/var/tmp/imgmount-bench}
rand_runtime=${RAND_RUNTIME:-5}
seq_max_runtime=30 # a sequential run stops after this many seconds even if the file is not done
groups=${BENCH:-qed,qcow2,compressed}
for g in ${groups//,/ }; do
  case $g in qed | qcow2 | compressed) ;; *) echo "BENCH: unknown group '$g' (qed, qcow2, compressed)" >&2; exit 2 ;; esac
done
want() { [[ ",$groups," == *",$1,"* ]]; }
IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh >/dev/null

rm -rf "$work" && mkdir -p "$work"
: >"$work/errors.log"
start=$SECONDS
our_mounts=()
qsd_pids=()
qsd_files=()
cleanup() {
  local m p f
  for m in "${our_mounts[@]}"; do
    if mountpoint -q "$m" 2>/dev/null; then bin/imgmount unmount "$m" >/dev/null 2>&1 || fusermount -uz "$m" 2>/dev/null || true; fi
  done
  for p in "${qsd_pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  for f in "${qsd_files[@]}"; do
    if mountpoint -q "$f" 2>/dev/null; then fusermount -uz "$f" 2>/dev/null || true; fi
  done
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -f "$work"/*.qed "$work"/*.qcow2 "$work"/*.src
  true
}
trap cleanup EXIT

note() { echo "$*" >>"$work/errors.log"; }

# fio_job FILE RW BS JOBS METRIC -> prints MB/s (METRIC mb) or IOPS (METRIC iops), or ERR
fio_job() {
  local file=$1 rw=$2 bs=$3 jobs=$4 metric=$5 extra=() out rc=0
  case $rw in
    rand*) extra+=(--runtime="$rand_runtime" --time_based) ;;
    *) extra+=(--runtime="$seq_max_runtime") ;;
  esac
  [ "$rw" = write ] && extra+=(--fsync_on_close=1)
  out=$(fio --name=bench --filename="$file" --rw="$rw" --bs="$bs" --size="${size_mb}M" --numjobs="$jobs" \
    --ioengine=psync --direct=1 --group_reporting --output-format=json "${extra[@]}" 2>>"$work/fio.stderr") || rc=$?
  node -e '
    const [metric, rc, what] = process.argv.slice(1);
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      let j;
      try { j = JSON.parse(s.slice(s.indexOf("{"))).jobs[0]; } catch { j = undefined; }
      const side = j && (j.write.io_bytes > 0 ? j.write : j.read);
      if (!j || j.error !== 0 || rc !== "0" || side.io_bytes === 0) {
        console.error(`${what}: fio exit ${rc}, error ${j ? j.error : "(no JSON output)"}, ${side ? side.io_bytes : 0} bytes`);
        console.log("ERR");
        return;
      }
      console.log(metric === "iops" ? Math.round(side.iops) : (side.bw_bytes / 1e6).toFixed(0));
    });' "$metric" "$rc" "fio --rw=$rw --bs=$bs --numjobs=$jobs $file" <<<"$out" 2>>"$work/errors.log"
}

median3() {
  case " $* " in *" ERR "*) echo ERR; return ;; esac
  printf '%s\n' "$@" | sort -n | sed -n 2p
}

warm() { cat "$@" >/dev/null; } # the host page cache of this machine drops pages quickly: warm it for both peers alike

rows=()
add_row() { rows+=("$1|$2|$3"); }
# row NAME OURS THEIRS: OURS and THEIRS are commands (evaluated with the run number in $i) that
# print one number; they run alternately, ours first, three times each; the cell is the median.
row() {
  local name=$1 ours_cmd=$2 theirs_cmd=$3 i o=() t=() t0=$SECONDS
  for i in 1 2 3; do
    o+=("$(eval "$ours_cmd")")
    t+=("$(eval "$theirs_cmd")")
  done
  add_row "$name" "$(median3 "${o[@]}")" "$(median3 "${t[@]}")"
  echo "$name: imgmount ${o[*]} | qemu-storage-daemon ${t[*]} ($((SECONDS - t0)) s)" >>"$work/runs.log"
}

buffered_read() { # one buffered read of the whole file with dd, MB/s
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { t = $(i-1) } } /copied/ { printf "%.0f\n", $1 / t / 1e6; ok = 1 } END { if (!ok) print "ERR" }'
}

# mount_ours GROUP [imgmount options] IMAGE... : mounts at $work/mnt-GROUP, logs to $work/imgmount-GROUP.log
mount_ours() {
  local group=$1; shift
  mkdir -p "$work/mnt-$group"
  our_mounts+=("$work/mnt-$group")
  bin/imgmount --log "$work/imgmount-$group.log" "$@" "$work/mnt-$group"
}

# start_qsd GROUP FORMAT ro|rw IMAGE... : one qemu-storage-daemon exporting every IMAGE as
# $work/qsd-GROUP/NAME.raw (NAME: the image's name without its extension)
start_qsd() {
  local group=$1 fmt=$2 mode=$3 n=0 img name args=() ro="" writable=on pid f
  shift 3
  [ "$mode" = ro ] && ro=",read-only=on" && writable=off
  mkdir -p "$work/qsd-$group"
  for img in "$@"; do
    name=$(basename "${img%.*}")
    touch "$work/qsd-$group/$name.raw"
    qsd_files+=("$work/qsd-$group/$name.raw")
    args+=(--blockdev "driver=file,node-name=file$n,filename=$img$ro"
      --blockdev "driver=$fmt,node-name=fmt$n,file=file$n$ro"
      --export "type=fuse,id=exp$n,node-name=fmt$n,mountpoint=$work/qsd-$group/$name.raw,writable=$writable")
    n=$((n + 1))
  done
  qemu-storage-daemon "${args[@]}" >"$work/qsd-$group.log" 2>&1 &
  pid=$!
  qsd_pids+=("$pid")
  for img in "$@"; do
    f="$work/qsd-$group/$(basename "${img%.*}").raw"
    for _ in $(seq 100); do [ "$(stat -c %s "$f")" -gt 0 ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if [ "$(stat -c %s "$f")" -eq 0 ]; then
      echo "qemu-storage-daemon did not export $f:" >&2; cat "$work/qsd-$group.log" >&2; exit 1
    fi
  done
  echo "$pid" >"$work/qsd-$group.pid"
}

stop_group() { # stop_group GROUP: unmount ours (waits for the images to be closed), stop theirs
  local group=$1 pid rc=0 qrc=0
  bin/imgmount unmount "$work/mnt-$group" >>"$work/imgmount-$group.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || note "imgmount unmount $work/mnt-$group failed with status $rc (see imgmount-$group.log)"
  pid=$(cat "$work/qsd-$group.pid")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || qrc=$?
  [ "$qrc" = 0 ] || note "qemu-storage-daemon ($group) exited with status $qrc after SIGTERM"
}

verify() { # verify LABEL FILE SOURCE: compares a mounted file with the raw data its image came from
  local out
  if out=$(cmp "$2" "$3" 2>&1); then echo "$1: same bytes as the source" >>"$work/verify.log"
  else echo "$1: DIFFERS from the source: cmp $2 $3: $out" >>"$work/verify.log"; fi
}

half=$((size_mb * 1024 * 1024 / 2))
if want qcow2 || want compressed; then
  # random data, written once per run and used by both peers
  head -c "$((size_mb * 1024 * 1024))" /dev/urandom >"$work/random.src"
fi

# --- QED (read-write): each peer has three fresh images, one per allocating-write run
if want qed; then
  for i in 1 2 3; do
    qemu-img create -q -f qed "$work/a$i.qed" "${size_mb}M"
    qemu-img create -q -f qed "$work/b$i.qed" "${size_mb}M"
  done
  mount_ours qed "$work/a1.qed" "$work/a2.qed" "$work/a3.qed"
  start_qsd qed qed rw "$work/b1.qed" "$work/b2.qed" "$work/b3.qed"
  mo=$work/mnt-qed q=$work/qsd-qed
  row "QED: allocating write 128k (MB/s)" 'fio_job $mo/a$i.raw write 128k 1 mb' 'fio_job $q/b$i.raw write 128k 1 mb'
  row "QED: rewrite 128k (MB/s)" 'fio_job $mo/a1.raw write 128k 1 mb' 'fio_job $q/b1.raw write 128k 1 mb'
  row "QED: sequential read 128k (MB/s)" 'fio_job $mo/a1.raw read 128k 1 mb' 'fio_job $q/b1.raw read 128k 1 mb'
  row "QED: random read 4k, 4 jobs (IOPS)" 'warm $work/a1.qed; fio_job $mo/a1.raw randread 4k 4 iops' \
    'warm $work/b1.qed; fio_job $q/b1.raw randread 4k 4 iops'
  row "QED: random write 4k, 4 jobs (IOPS)" 'fio_job $mo/a1.raw randwrite 4k 4 iops' 'fio_job $q/b1.raw randwrite 4k 4 iops'
  buffered_read "$mo/a1.raw" >/dev/null; buffered_read "$q/b1.raw" >/dev/null # first read fills the page cache
  row "QED: buffered re-read, dd (MB/s)" 'buffered_read $mo/a1.raw' 'buffered_read $q/b1.raw'
  stop_group qed
  for i in 1 2 3; do
    for img in "$work/a$i.qed" "$work/b$i.qed"; do
      qemu-img check -q "$img" >>"$work/verify.log" 2>&1 && echo "qemu-img check $(basename "$img"): clean" >>"$work/verify.log" ||
        echo "qemu-img check $(basename "$img"): status $? (output above)" >>"$work/verify.log"
    done
  done
fi

# --- qcow2 (read-only), converted from random data; both peers read the same image file
if want qcow2; then
  qemu-img convert -O qcow2 -f raw "$work/random.src" "$work/plain.qcow2"
  mount_ours qcow2 -r "$work/plain.qcow2"
  start_qsd qcow2 qcow2 ro "$work/plain.qcow2"
  mo=$work/mnt-qcow2/plain.raw q=$work/qsd-qcow2/plain.raw img=$work/plain.qcow2
  row "qcow2: sequential read 1M (MB/s)" 'fio_job $mo read 1M 1 mb' 'fio_job $q read 1M 1 mb'
  row "qcow2: random read 4k, 1 job (IOPS)" 'warm $img; fio_job $mo randread 4k 1 iops' 'warm $img; fio_job $q randread 4k 1 iops'
  row "qcow2: random read 4k, 4 jobs (IOPS)" 'warm $img; fio_job $mo randread 4k 4 iops' 'warm $img; fio_job $q randread 4k 4 iops'
  verify "qcow2 imgmount" "$mo" "$work/random.src"
  verify "qcow2 qemu-storage-daemon" "$q" "$work/random.src"
  stop_group qcow2
fi

# --- compressed qcow2 (read-only): first half text (compressible), second half random
if want compressed; then
  corpus=$work/corpus.txt
  find /usr/share/doc /usr/share/common-licenses -type f \( -name copyright -o -path '*/common-licenses/*' \) 2>/dev/null |
    sort | xargs -r cat >"$corpus" || true
  [ "$(stat -c %s "$corpus")" -ge 1048576 ] || seq 1 2000000 >>"$corpus" # little documentation installed: numbers as text
  n=$((half / $(stat -c %s "$corpus") + 1))
  for _ in $(seq "$n"); do cat "$corpus"; done | head -c "$half" >"$work/mixed.src" || true
  tail -c "$((size_mb * 1024 * 1024 - half))" "$work/random.src" >>"$work/mixed.src"
  rm -f "$corpus"
  kinds=(deflate)
  qemu-img convert -c -O qcow2 -f raw "$work/mixed.src" "$work/deflate.qcow2"
  if qemu-img create -q -f qcow2 -o compression_type=zstd "$work/probe.qcow2" 1M 2>/dev/null; then
    rm -f "$work/probe.qcow2"
    qemu-img convert -c -O qcow2 -o compression_type=zstd -f raw "$work/mixed.src" "$work/zstd.qcow2"
    kinds+=(zstd)
  else
    note "qemu-img here cannot write compression_type=zstd: the zstd rows are left out"
  fi
  imgs=()
  for k in "${kinds[@]}"; do imgs+=("$work/$k.qcow2"); done
  mount_ours compressed -r "${imgs[@]}"
  start_qsd compressed qcow2 ro "${imgs[@]}"
  for k in "${kinds[@]}"; do
    mo=$work/mnt-compressed/$k.raw q=$work/qsd-compressed/$k.raw img=$work/$k.qcow2
    row "qcow2 $k: sequential read 128k (MB/s)" 'fio_job $mo read 128k 1 mb' 'fio_job $q read 128k 1 mb'
    row "qcow2 $k: sequential read 1M (MB/s)" 'fio_job $mo read 1M 1 mb' 'fio_job $q read 1M 1 mb'
    row "qcow2 $k: random read 4k, 1 job (IOPS)" 'warm $img; fio_job $mo randread 4k 1 iops' 'warm $img; fio_job $q randread 4k 1 iops'
    verify "qcow2 $k imgmount" "$mo" "$work/mixed.src"
    verify "qcow2 $k qemu-storage-daemon" "$q" "$work/mixed.src"
  done
  stop_group compressed
fi

printf '\nfio, psync, O_DIRECT, %s MiB images, random runs %s s; median of 3 alternating runs\n' "$size_mb" "$rand_runtime"
printf '%-44s %10s %20s %7s\n' "workload" "imgmount" "qemu-storage-daemon" "ratio"
for r in "${rows[@]}"; do
  IFS='|' read -r name ours theirs <<<"$r"
  ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "n/a" }')
  printf '%-44s %10s %20s %7s\n' "$name" "$ours" "$theirs" "$ratio"
done
echo
[ -s "$work/verify.log" ] && cat "$work/verify.log"
[ -s "$work/errors.log" ] && { echo "errors:"; cat "$work/errors.log"; }
for log in "$work"/qsd-*.log; do
  [ -s "$log" ] && { echo "$(basename "$log"):"; head -n 20 "$log"; }
done
for log in "$work"/imgmount-*.log; do
  [ -e "$log" ] || continue
  c=$(grep -ciE 'error|eio|fail|warn|corrupt|cannot' "$log" || true)
  [ "$c" = 0 ] || { echo "$(basename "$log"): $c lines about errors:"; grep -iE 'error|eio|fail|warn|corrupt|cannot' "$log" | head -n 20; }
done
echo "runs: $work/runs.log; logs in $work; total $((SECONDS - start)) s"
