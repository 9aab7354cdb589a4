#!/usr/bin/env bash
# Benchmark: imgmount's FUSE mount against qemu-storage-daemon's FUSE export
# (the peer to beat), in the same run, on the same kind of image, with fio.
# Needs root, fio and qemu-storage-daemon (IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh).
# docs/performance.md records a run and explains every row.
#
# Usage: [BENCH=qed,qcow2,compressed,ceiling,rss,check,convert] scripts/bench.sh [SIZE_MB] [WORKDIR]
#   SIZE_MB   virtual size of every image except rss's (default 1024, or $SIZE_MB)
#   WORKDIR   scratch directory, emptied first (default /var/tmp/imgmount-bench)
#   BENCH     groups to run, comma-separated (default all eight):
#     qed        read-write QED images whose first half was written by qemu-io (fio span: that
#                half): sequential read 1M, 4k random read with 1 and 4 jobs, 4k random write
#                with 4 jobs, 4k random write + fdatasync (1 job), allocating write 1M (a fresh
#                image for every run of both peers), buffered re-read (dd, the second of two reads)
#     qcow2      a read-only qcow2 image converted from random data: sequential read 1M,
#                4k random read with 1 and 4 jobs
#     qcow2w     read-write qcow2 images whose first half qemu-io wrote (fio span: that half):
#                4k random write with 4 jobs, 4k random write + fdatasync (1 job); and fresh
#                images (one per run of each peer): allocating write 1M, allocating 4k random
#                writes (each allocates a 64 KiB cluster), 1 job; then qemu-img check of all
#     compressed read-only compressed qcow2 (half text, half random data; deflate, and zstd when
#                qemu-img supports it): sequential read 128k and 1M, 4k random read, 1 job
#     ceiling    the transport alone, no I/O behind it: imgmount serves a never-written sparse raw
#                file (-f raw; holes are answered from the map, SEEK_DATA/SEEK_HOLE, not read),
#                qemu-storage-daemon its null-co driver (read-zeroes=on): 4k random read with 1
#                and 4 jobs, sequential read 1M
#     rss        peak RSS (VmHWM) of each daemon serving a 1 TiB qcow2 image with 64 KiB of data
#                every 4 GiB (256 L2 tables), read by fio 4k random reads over the whole 1 TiB
#     check      `imgmount check` against `qemu-img check` (whole command, milliseconds, median of
#                3 alternating runs, page cache warm): the 1 TiB qcow2 of the rss group, and
#                SIZE_MB images written whole by qemu-io (qcow2 and QED)
#     convert    `imgmount convert` against `qemu-img convert` (whole command, milliseconds, median of
#                3 alternating runs, page cache warm, DEST removed before each run): SIZE_MB images
#                whose first half qemu-io wrote, plus a zero cluster and data near the end:
#                qcow2 -> raw, raw (sparse) -> qcow2, qed -> qcow2
#   RAND_RUNTIME  seconds per random-I/O fio run (default 5)
#   SEQ_RUNTIME   seconds per sequential-read run of the qed and ceiling groups (default 3; the
#                 qcow2 and compressed groups read their whole file once)
#   RSS_RUNTIME   seconds of the rss group's fio run on each peer (default 10)
#   BENCH_KEEP=1  keep the images and raw files in WORKDIR at the end (logs are always kept)
#
# Both peers are mounted at the same time (imgmount at WORKDIR/mnt-GROUP, qemu-storage-daemon
# exports at WORKDIR/qsd-GROUP/NAME.raw), and the three runs of every cell alternate between them
# (ours, theirs, ours, theirs, ours, theirs), since the machine is shared and noisy. A read-only
# group gives both peers the same image file; a read-write group gives each its own copy. Every
# cell is the median of the three runs; ratio is imgmount / qemu-storage-daemon (higher is better
# for us). fio uses psync with O_DIRECT on the mounted file. Beside each cell, the CPU each daemon
# used during its runs (median, % of one core): its main thread (imgmount: the JavaScript thread,
# which answers every FUSE request) / the whole process (thread pool included). A run whose fio
# reports an error shows ERR, explained under the table. Mounted data is compared with its source
# (or the two peers with each other). WORKDIR/runs.log has every run, with the CPU figures and the
# share of time each main thread was runnable but waiting for a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-${SIZE_MB:-1024}}
work=${2:-/var/tmp/imgmount-bench}
rand_runtime=${RAND_RUNTIME:-5}
seq_runtime=${SEQ_RUNTIME:-3}
rss_runtime=${RSS_RUNTIME:-10}
seq_max_runtime=30 # a whole-file sequential run stops after this many seconds even if the file is not done
all_groups=qed,qcow2,qcow2w,compressed,ceiling,rss,check,convert
groups=${BENCH:-$all_groups}
for g in ${groups//,/ }; do
  case ",$all_groups," in *",$g,"*) ;; *) echo "BENCH: unknown group '$g' (${all_groups//,/, })" >&2; exit 2 ;; esac
done
want() { [[ ",$groups," == *",$1,"* ]]; }
IMGMOUNT_BENCH_DEPS=1 scripts/install-deps.sh >/dev/null

rm -rf "$work" && mkdir -p "$work"
: >"$work/errors.log"
start=$SECONDS
clk=$(getconf CLK_TCK)
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
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -f "$work"/*.qed "$work"/*.qcow2 "$work"/*.src "$work"/*.img
  true
}
trap cleanup EXIT

note() { echo "$*" >>"$work/errors.log"; }

# fio_job FILE RW BS JOBS METRIC [FIO OPTION...] -> prints MB/s (METRIC mb) or IOPS (METRIC iops),
# or ERR. The span is $span (default: the whole image). Random runs last $rand_runtime s unless an
# option sets --runtime; a sequential run goes through the span once.
span=${size_mb}M
fio_job() {
  local file=$1 rw=$2 bs=$3 jobs=$4 metric=$5 extra=() out rc=0
  shift 5
  if [[ " $* " != *" --runtime="* ]]; then
    case $rw in
      rand*) extra+=(--runtime="$rand_runtime" --time_based) ;;
      *) extra+=(--runtime="$seq_max_runtime") ;;
    esac
  fi
  [ "$rw" = write ] && extra+=(--fsync_on_close=1)
  out=$(fio --name=bench --filename="$file" --rw="$rw" --bs="$bs" --size="$span" --numjobs="$jobs" \
    --ioengine=psync --direct=1 --group_reporting --output-format=json "${extra[@]}" "$@" 2>>"$work/fio.stderr") || rc=$?
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
    });' "$metric" "$rc" "fio --rw=$rw --bs=$bs --numjobs=$jobs $* $file" <<<"$out" 2>>"$work/errors.log"
}

median3() {
  case " $* " in *" ERR "*) echo ERR; return ;; esac
  printf '%s\n' "$@" | sort -n | sed -n 2p
}

# The host page cache can lose an image between rows (on the reference machine a DAMON "pageout"
# scheme reclaims memory idle for about a minute): read rows warm it first, for both peers alike.
warm() { cat "$@" >/dev/null; }

# ticks PID -> "MAIN ALL": CPU time (utime + stime, clock ticks) of the process's main thread
# and of the whole process (every thread, finished ones included)
ticks() {
  local m a
  m=$(sed 's/.*) //' "/proc/$1/task/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }') || true
  a=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ print $12 + $13 }') || true
  echo "${m:-0} ${a:-0}"
}

# queued PID -> nanoseconds the main thread of PID has spent runnable but waiting for a CPU
queued() { awk '{ print $2 }' "/proc/$1/task/$1/schedstat" 2>/dev/null || echo 0; }

# timed PID CMD: evaluates CMD (with $i set), its output in $res; the CPU PID used meanwhile in
# $cpu_main and $cpu_all (% of one core), and in $cpu_wait the % of the time its main thread
# was ready to run but waiting for a CPU (busy + waiting near 100: the main thread is the bound)
timed() {
  local pid=$1 cmd=$2 c0 c1 t0 t1 w0 w1
  c0=$(ticks "$pid"); w0=$(queued "$pid"); t0=$(date +%s%N)
  res=$(eval "$cmd")
  t1=$(date +%s%N); c1=$(ticks "$pid"); w1=$(queued "$pid")
  cpu_wait=$(((${w1:-0} - ${w0:-0}) * 100 / (t1 - t0)))
  read -r cpu_main cpu_all < <(awk -v a="$c0" -v b="$c1" -v t="$((t1 - t0))" -v hz="$clk" 'BEGIN {
    split(a, x, " "); split(b, y, " "); s = t / 1e9 * hz / 100
    printf "%.0f %.0f\n", (y[1] - x[1]) / s, (y[2] - x[2]) / s }')
}

rows=()
# row NAME OURS THEIRS [OURS_PREP THEIRS_PREP]: OURS and THEIRS are commands (evaluated with the
# run number in $i) that print one number; they run alternately, ours first, three times each,
# each after its PREP (not measured: warming, a first read); the cell is the median. The daemons
# measured for CPU are $our_pid and $qsd_pid.
row() {
  local name=$1 ours_cmd=$2 theirs_cmd=$3 ours_prep=${4:-:} theirs_prep=${5:-:} i o=() t=() om=() oa=() ow=() tm=() ta=() tw=() t0=$SECONDS
  for i in 1 2 3; do
    eval "$ours_prep"
    timed "$our_pid" "$ours_cmd"; o+=("$res"); om+=("$cpu_main"); oa+=("$cpu_all"); ow+=("$cpu_wait")
    eval "$theirs_prep"
    timed "$qsd_pid" "$theirs_cmd"; t+=("$res"); tm+=("$cpu_main"); ta+=("$cpu_all"); tw+=("$cpu_wait")
  done
  rows+=("$name|$(median3 "${o[@]}")|$(median3 "${t[@]}")|$(median3 "${om[@]}")/$(median3 "${oa[@]}")|$(median3 "${tm[@]}")/$(median3 "${ta[@]}")")
  echo "$name: imgmount ${o[*]} (CPU % main ${om[*]}, all ${oa[*]}, main waiting for a CPU ${ow[*]}) | qemu-storage-daemon ${t[*]} (CPU % main ${tm[*]}, all ${ta[*]}, main waiting ${tw[*]}) ($((SECONDS - t0)) s)" >>"$work/runs.log"
}
notes=()

buffered_read() { # one buffered read of the whole file with dd, MB/s
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { t = $(i-1) } } /copied/ { printf "%.0f\n", $1 / t / 1e6; ok = 1 } END { if (!ok) print "ERR" }'
}

# mount_ours GROUP [imgmount options] IMAGE... : mounts at $work/mnt-GROUP, logs to
# $work/imgmount-GROUP.log, sets $our_pid (the daemon's pid, from its "serving ... (pid N)" line)
mount_ours() {
  local group=$1; shift
  mkdir -p "$work/mnt-$group"
  our_mounts+=("$work/mnt-$group")
  bin/imgmount --log "$work/imgmount-$group.log" "$@" "$work/mnt-$group"
  our_pid=$(sed -n 's/.* serving .* (pid \([0-9]*\))$/\1/p' "$work/imgmount-$group.log" | tail -n 1)
  if [ -z "$our_pid" ] || ! kill -0 "$our_pid" 2>/dev/null; then
    echo "imgmount ($group): no daemon pid in its log:" >&2; cat "$work/imgmount-$group.log" >&2; exit 1
  fi
}

# start_qsd GROUP FORMAT ro|rw IMAGE... : one qemu-storage-daemon exporting every IMAGE as
# $work/qsd-GROUP/NAME.raw (NAME: the image's name without its extension)
start_qsd() {
  local group=$1 fmt=$2 mode=$3 n=0 img name args=() files=() ro="" writable=on
  shift 3
  [ "$mode" = ro ] && ro=",read-only=on" && writable=off
  for img in "$@"; do
    name=$(basename "${img%.*}")
    files+=("$work/qsd-$group/$name.raw")
    args+=(--blockdev "driver=file,node-name=file$n,filename=$img$ro"
      --blockdev "driver=$fmt,node-name=fmt$n,file=file$n$ro"
      --export "type=fuse,id=exp$n,node-name=fmt$n,mountpoint=$work/qsd-$group/$name.raw,writable=$writable")
    n=$((n + 1))
  done
  launch_qsd "$group" "${files[@]}" -- "${args[@]}"
}

# launch_qsd GROUP EXPORTED_FILE... -- QSD ARGS...: starts qemu-storage-daemon, waits for every
# export, sets $qsd_pid
launch_qsd() {
  local group=$1 files=() f
  shift
  while [ "$1" != -- ]; do files+=("$1"); shift; done
  shift
  mkdir -p "$work/qsd-$group"
  for f in "${files[@]}"; do touch "$f"; qsd_files+=("$f"); done
  qemu-storage-daemon "$@" >"$work/qsd-$group.log" 2>&1 &
  qsd_pid=$!
  qsd_pids+=("$qsd_pid")
  for f in "${files[@]}"; do
    for _ in $(seq 100); do [ "$(stat -c %s "$f")" -gt 0 ] && break; kill -0 "$qsd_pid" 2>/dev/null || break; sleep 0.1; done
    if [ "$(stat -c %s "$f")" -eq 0 ]; then
      echo "qemu-storage-daemon did not export $f:" >&2; cat "$work/qsd-$group.log" >&2; exit 1
    fi
  done
  echo "$qsd_pid" >"$work/qsd-$group.pid"
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

verify() { # verify LABEL FILE SOURCE [CMP OPTION...]: compares a mounted file with the data its image came from
  local out
  if out=$(cmp "${@:4}" "$2" "$3" 2>&1); then echo "$1: same bytes as the source" >>"$work/verify.log"
  else echo "$1: DIFFERS from the source: cmp ${*:4} $2 $3: $out" >>"$work/verify.log"; fi
}

check_image() { # check_image IMAGE: qemu-img check, result to verify.log
  if qemu-img check -q "$1" >>"$work/verify.log" 2>&1; then echo "qemu-img check $(basename "$1"): clean" >>"$work/verify.log"
  else echo "qemu-img check $(basename "$1"): status $? (output above)" >>"$work/verify.log"; fi
}

vm_kb() { sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$1/status"; } # vm_kb PID VmHWM|VmRSS

size_bytes=$((size_mb * 1024 * 1024))
half=$((size_bytes / 2))
if want qcow2 || want compressed; then
  # random data, written once per run and used by both peers
  head -c "$size_bytes" /dev/urandom >"$work/random.src"
fi

# --- QED (read-write): each peer has its own copy of an image whose first half qemu-io wrote,
# and three fresh images, one per allocating-write run
if want qed; then
  # Both peers' images are copies made the same way: the file qemu-io wrote has other page-cache
  # folios (written in one 512 MiB request) than a copy, and a 4k pwrite into it cost 118-127 us
  # against 13-17 us into a copy here (ext4 on Linux 6.18), whichever daemon writes.
  qemu-img create -q -f qed "$work/master.qed" "${size_mb}M"
  qemu-io -f qed -c "write -q -P 0xa5 0 $half" "$work/master.qed" >/dev/null
  cp --sparse=always "$work/master.qed" "$work/a.qed"
  cp --sparse=always "$work/master.qed" "$work/b.qed"
  rm -f "$work/master.qed"
  head -c "$half" /dev/zero | tr '\0' '\245' >"$work/qed.src" && truncate -s "$size_bytes" "$work/qed.src"
  for i in 1 2 3; do
    qemu-img create -q -f qed "$work/a$i.qed" "${size_mb}M"
    qemu-img create -q -f qed "$work/b$i.qed" "${size_mb}M"
  done
  mount_ours qed "$work/a.qed" "$work/a1.qed" "$work/a2.qed" "$work/a3.qed"
  start_qsd qed qed rw "$work/b.qed" "$work/b1.qed" "$work/b2.qed" "$work/b3.qed"
  mo=$work/mnt-qed q=$work/qsd-qed
  verify "QED imgmount (before the writes)" "$mo/a.raw" "$work/qed.src"
  verify "QED qemu-storage-daemon (before the writes)" "$q/b.raw" "$work/qed.src"
  rm -f "$work/qed.src"
  span=$((half / 1048576))M
  row "QED: sequential read 1M (MB/s)" "fio_job \$mo/a.raw read 1M 1 mb --runtime=$seq_runtime --time_based" \
    "fio_job \$q/b.raw read 1M 1 mb --runtime=$seq_runtime --time_based" 'warm $work/a.qed' 'warm $work/b.qed'
  row "QED: random read 4k, 1 job (IOPS)" 'fio_job $mo/a.raw randread 4k 1 iops' 'fio_job $q/b.raw randread 4k 1 iops' \
    'warm $work/a.qed' 'warm $work/b.qed'
  row "QED: random read 4k, 4 jobs (IOPS)" 'fio_job $mo/a.raw randread 4k 4 iops' 'fio_job $q/b.raw randread 4k 4 iops' \
    'warm $work/a.qed' 'warm $work/b.qed'
  row "QED: random write 4k, 4 jobs (IOPS)" 'fio_job $mo/a.raw randwrite 4k 4 iops' 'fio_job $q/b.raw randwrite 4k 4 iops'
  row "QED: random write 4k + fdatasync, 1 job (IOPS)" 'fio_job $mo/a.raw randwrite 4k 1 iops --fdatasync=1' \
    'fio_job $q/b.raw randwrite 4k 1 iops --fdatasync=1'
  row "QED: allocating write 1M, fresh image (MB/s)" 'fio_job $mo/a$i.raw write 1M 1 mb' 'fio_job $q/b$i.raw write 1M 1 mb'
  span=${size_mb}M
  row "QED: buffered re-read, dd, 2nd read (MB/s) [1]" 'buffered_read $mo/a.raw' 'buffered_read $q/b.raw' \
    'buffered_read $mo/a.raw >/dev/null' 'buffered_read $q/b.raw >/dev/null'
  notes+=("[1] imgmount opens with FOPEN_KEEP_CACHE, so its second read comes from the kernel's page cache of the
    mounted file; qemu-storage-daemon's export does not keep the cache across opens, so its second read goes
    through FUSE again. This row measures that cache, not the transport.")
  stop_group qed
  for img in "$work"/a.qed "$work"/b.qed "$work"/a[123].qed "$work"/b[123].qed; do check_image "$img"; done
fi

# --- qcow2 (read-only), converted from random data; both peers read the same image file
if want qcow2; then
  qemu-img convert -O qcow2 -f raw "$work/random.src" "$work/plain.qcow2"
  mount_ours qcow2 -r "$work/plain.qcow2"
  start_qsd qcow2 qcow2 ro "$work/plain.qcow2"
  mo=$work/mnt-qcow2/plain.raw q=$work/qsd-qcow2/plain.raw img=$work/plain.qcow2
  row "qcow2: sequential read 1M (MB/s)" 'fio_job $mo read 1M 1 mb' 'fio_job $q read 1M 1 mb'
  row "qcow2: random read 4k, 1 job (IOPS)" 'fio_job $mo randread 4k 1 iops' 'fio_job $q randread 4k 1 iops' 'warm $img' 'warm $img'
  row "qcow2: random read 4k, 4 jobs (IOPS)" 'fio_job $mo randread 4k 4 iops' 'fio_job $q randread 4k 4 iops' 'warm $img' 'warm $img'
  verify "qcow2 imgmount" "$mo" "$work/random.src"
  verify "qcow2 qemu-storage-daemon" "$q" "$work/random.src"
  stop_group qcow2
fi

# --- qcow2 (read-write): like the QED group, each peer its own copy of a half-written image,
# and fresh images for the allocating runs
if want qcow2w; then
  # Both copies made the same way (see the QED group).
  qemu-img create -q -f qcow2 "$work/wmaster.qcow2" "${size_mb}M"
  qemu-io -f qcow2 -c "write -q -P 0xa5 0 $half" "$work/wmaster.qcow2" >/dev/null
  cp --sparse=always "$work/wmaster.qcow2" "$work/wa.qcow2"
  cp --sparse=always "$work/wmaster.qcow2" "$work/wb.qcow2"
  rm -f "$work/wmaster.qcow2"
  fresh=()
  for i in 1 2 3; do
    for side in a b; do
      for kind in seq rand; do
        qemu-img create -q -f qcow2 "$work/w$side$kind$i.qcow2" "${size_mb}M"
        fresh+=("$work/w$side$kind$i.qcow2")
      done
    done
  done
  mount_ours qcow2w "$work/wa.qcow2" "$work"/waseq[123].qcow2 "$work"/warand[123].qcow2
  start_qsd qcow2w qcow2 rw "$work/wb.qcow2" "$work"/wbseq[123].qcow2 "$work"/wbrand[123].qcow2
  mo=$work/mnt-qcow2w q=$work/qsd-qcow2w
  span=$((half / 1048576))M
  row "qcow2: random write 4k, 4 jobs (IOPS)" 'fio_job $mo/wa.raw randwrite 4k 4 iops' 'fio_job $q/wb.raw randwrite 4k 4 iops'
  row "qcow2: random write 4k + fdatasync, 1 job (IOPS)" 'fio_job $mo/wa.raw randwrite 4k 1 iops --fdatasync=1' \
    'fio_job $q/wb.raw randwrite 4k 1 iops --fdatasync=1'
  span=${size_mb}M
  row "qcow2: allocating write 1M, fresh image (MB/s)" 'fio_job $mo/waseq$i.raw write 1M 1 mb' 'fio_job $q/wbseq$i.raw write 1M 1 mb'
  row "qcow2: allocating random write 4k, fresh image (IOPS)" 'fio_job $mo/warand$i.raw randwrite 4k 1 iops' \
    'fio_job $q/wbrand$i.raw randwrite 4k 1 iops'
  stop_group qcow2w
  for img in "$work"/wa.qcow2 "$work"/wb.qcow2 "${fresh[@]}"; do check_image "$img"; done
fi

# --- compressed qcow2 (read-only): first half text (compressible), second half random
if want compressed; then
  corpus=$work/corpus.txt
  find /usr/share/doc /usr/share/common-licenses -type f \( -name copyright -o -path '*/common-licenses/*' \) 2>/dev/null |
    sort | xargs -r cat >"$corpus" || true
  [ "$(stat -c %s "$corpus")" -ge 1048576 ] || seq 1 2000000 >>"$corpus" # little documentation installed: numbers as text
  n=$((half / $(stat -c %s "$corpus") + 1))
  for _ in $(seq "$n"); do cat "$corpus"; done | head -c "$half" >"$work/mixed.src" || true
  tail -c "$((size_bytes - half))" "$work/random.src" >>"$work/mixed.src"
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
    row "qcow2 $k: random read 4k, 1 job (IOPS)" 'fio_job $mo randread 4k 1 iops' 'fio_job $q randread 4k 1 iops' 'warm $img' 'warm $img'
    verify "qcow2 $k imgmount" "$mo" "$work/mixed.src"
    verify "qcow2 $k qemu-storage-daemon" "$q" "$work/mixed.src"
  done
  stop_group compressed
fi

# --- the transport's ceiling: a file with no I/O behind it on either side
if want ceiling; then
  truncate -s "${size_mb}M" "$work/sparse.img" # never written: one hole
  mount_ours ceiling -r -f raw "$work/sparse.img"
  launch_qsd ceiling "$work/qsd-ceiling/null.raw" -- \
    --blockdev "driver=null-co,node-name=n0,size=$size_bytes,read-zeroes=on" \
    --export "type=fuse,id=exp0,node-name=n0,mountpoint=$work/qsd-ceiling/null.raw,writable=off"
  mo=$work/mnt-ceiling/sparse.raw q=$work/qsd-ceiling/null.raw
  row "no-I/O ceiling [2]: random read 4k, 1 job (IOPS)" 'fio_job $mo randread 4k 1 iops' 'fio_job $q randread 4k 1 iops'
  row "no-I/O ceiling [2]: random read 4k, 4 jobs (IOPS)" 'fio_job $mo randread 4k 4 iops' 'fio_job $q randread 4k 4 iops'
  row "no-I/O ceiling [2]: sequential read 1M (MB/s)" "fio_job \$mo read 1M 1 mb --runtime=$seq_runtime --time_based" \
    "fio_job \$q read 1M 1 mb --runtime=$seq_runtime --time_based"
  verify "ceiling imgmount (zeros)" "$mo" /dev/zero -n "$size_bytes"
  verify "ceiling qemu-storage-daemon (zeros)" "$q" /dev/zero -n "$size_bytes"
  notes+=("[2] what each side serves: imgmount a ${size_mb} MiB sparse raw file that was never written, mounted with
    -f raw (every read is a hole, answered from the map, SEEK_DATA, without reading the file);
    qemu-storage-daemon its null-co driver (read-zeroes=on: zeros from memory, no file at all). Each
    side's FUSE transport with (almost) nothing behind it.")
  stop_group ceiling
fi

# --- peak RSS serving a 1 TiB qcow2 image with scattered data
rss_lines=()
if want rss; then
  img=$work/big.qcow2 step=$((4 << 30)) n=256
  qemu-img create -q -f qcow2 "$img" 1T
  cmds=()
  for k in $(seq 0 $((n - 1))); do cmds+=(-c "write -q -P 0x5a $((k * step)) 64k"); done
  qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null
  mount_ours rss -r "$img"
  start_qsd rss qcow2 ro "$img"
  mo=$work/mnt-rss/big.raw q=$work/qsd-rss/big.raw
  head -c 65536 /dev/zero | tr '\0' '\132' >"$work/pattern.src"
  for k in 0 1 128 255; do
    for f in "$mo" "$q"; do
      if ! cmp -s <(dd if="$f" bs=64k skip=$((k * step / 65536)) count=1 status=none) "$work/pattern.src"; then
        echo "rss: $f at $((k * step)) DIFFERS from what qemu-io wrote" >>"$work/verify.log"
      elif ! cmp -s <(dd if="$f" bs=64k skip=$((k * step / 65536 + 1)) count=1 status=none) <(head -c 65536 /dev/zero); then
        echo "rss: $f at $((k * step + 65536)) is not zeros" >>"$work/verify.log"
      fi
    done
  done
  grep -q '^rss:' "$work/verify.log" 2>/dev/null || echo "rss: both peers read qemu-io's data at 4 places and zeros after it" >>"$work/verify.log"
  span=1T
  for side in ours theirs; do
    if [ $side = ours ]; then pid=$our_pid f=$mo label=imgmount; else pid=$qsd_pid f=$q label=qemu-storage-daemon; fi
    before=$(vm_kb "$pid" VmRSS)
    timed "$pid" "fio_job $f randread 4k 1 iops --runtime=$rss_runtime --time_based"
    rss_lines+=("$(awk -v l="$label" -v b="$before" -v a="$(vm_kb "$pid" VmRSS)" -v h="$(vm_kb "$pid" VmHWM)" \
      -v r="$res" -v c="$cpu_main/$cpu_all" 'BEGIN { printf "%-20s %7.1f MiB %7.1f MiB %7.1f MiB %9s %9s", l, b / 1024, a / 1024, h / 1024, r, c }')")
    echo "rss $label: ${rss_lines[-1]} (main waiting for a CPU $cpu_wait %)" >>"$work/runs.log"
  done
  span=${size_mb}M
  stop_group rss
fi

# --- check: the whole command of each tool, page cache warm
check_lines=()
if want check; then
  qemu-img create -q -f qcow2 "$work/ck-1t.qcow2" 1T
  cmds=()
  for k in $(seq 0 255); do cmds+=(-c "write -q -P 0x5a $((k * (4 << 30))) 64k"); done
  qemu-io -f qcow2 "${cmds[@]}" "$work/ck-1t.qcow2" >/dev/null
  for fmt in qcow2 qed; do
    qemu-img create -q -f $fmt "$work/ck-full.$fmt" "${size_mb}M"
    qemu-io -f $fmt -c "write -q -P 0x33 0 ${size_mb}M" "$work/ck-full.$fmt" >/dev/null
  done
  ms() { local t0 rc=0; t0=$(date +%s%N); "$@" >/dev/null 2>&1 || rc=$?; [ $rc = 0 ] && echo $(( ($(date +%s%N) - t0) / 1000000 )) || echo ERR; }
  for img in "$work/ck-1t.qcow2" "$work/ck-full.qcow2" "$work/ck-full.qed"; do
    cat "$img" >/dev/null
    o=() t=()
    for _ in 1 2 3; do o+=("$(ms bin/imgmount check "$img")"); t+=("$(ms qemu-img check "$img")"); done
    mo=$(printf '%s\n' "${o[@]}" | sort -n | sed -n 2p) mt=$(printf '%s\n' "${t[@]}" | sort -n | sed -n 2p)
    echo "check $(basename "$img"): imgmount ${o[*]} ms | qemu-img ${t[*]} ms" >>"$work/runs.log"
    check_lines+=("$(awk -v n="$(basename "$img")" -v a="$mo" -v b="$mt" 'BEGIN { r = (a ~ /^[0-9]+$/ && b ~ /^[0-9]+$/ && a > 0) ? sprintf("%.2f", b / a) : "n/a"; printf "%-30s %9s %9s %6s", n, a, b, r }')")
  done
fi

# --- convert: the whole command of each tool, page cache warm, a fresh DEST every run
convert_lines=()
if want convert; then
  half=$((size_mb / 2))
  qemu-img create -q -f qcow2 "$work/cv-src.qcow2" "${size_mb}M"
  qemu-io -f qcow2 -c "write -q -P 0x4c 0 ${half}M" -c "write -q -z ${half}M 64k" -c "write -q -P 0x4d $((size_mb - 1))M 64k" "$work/cv-src.qcow2" >/dev/null
  qemu-img convert -f qcow2 -O raw "$work/cv-src.qcow2" "$work/cv-src.img"
  qemu-img convert -f qcow2 -O qed "$work/cv-src.qcow2" "$work/cv-src.qed"
  ms() { local t0 rc=0; t0=$(date +%s%N); "$@" >/dev/null 2>&1 || rc=$?; [ $rc = 0 ] && echo $(( ($(date +%s%N) - t0) / 1000000 )) || echo ERR; }
  for pair in qcow2:raw:img raw:qcow2:qcow2 qed:qcow2:qcow2; do
    IFS=: read -r from to ext <<<"$pair"
    src="$work/cv-src.${from/raw/img}" dest="$work/cv-dest.$ext"
    cat "$src" >/dev/null
    o=() t=() w=()
    for _ in 1 2 3; do
      rm -f "$dest"; o+=("$(ms bin/imgmount convert -f "$from" -O "$to" "$src" "$dest")")
      [ "${o[-1]}" = ERR ] || qemu-img compare -q -f "$from" -F "$to" "$src" "$dest" || { note "convert $from -> $to: imgmount's DEST differs from the source"; o[-1]=ERR; }
      rm -f "$dest"; t+=("$(ms qemu-img convert -f "$from" -O "$to" "$src" "$dest")")
      # -t writeback: qemu-img then flushes DEST when it closes it, as imgmount always does
      # (its default cache mode, unsafe, never does: DEST may still be only in the page cache).
      rm -f "$dest"; w+=("$(ms qemu-img convert -t writeback -f "$from" -O "$to" "$src" "$dest")")
    done
    rm -f "$dest"
    mo=$(median3 "${o[@]}") mt=$(median3 "${t[@]}") mw=$(median3 "${w[@]}")
    echo "convert $from -> $to: imgmount ${o[*]} ms | qemu-img ${t[*]} ms | qemu-img -t writeback ${w[*]} ms" >>"$work/runs.log"
    convert_lines+=("$(awk -v n="$from -> $to" -v a="$mo" -v b="$mt" -v c="$mw" 'function r(x) { return (a ~ /^[0-9]+$/ && x ~ /^[0-9]+$/ && a > 0) ? sprintf("%.2f", x / a) : "n/a" } BEGIN { printf "%-30s %9s %9s %6s %9s %6s", n, a, b, r(b), c, r(c) }')")
  done
fi

printf '\n%s; %s cores, Linux %s, Node %s, %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" "$(uname -r)" \
  "$(node --version)" "$(qemu-storage-daemon --version | head -n 1 | sed 's/ (.*//')"
printf 'fio, psync, O_DIRECT, %s MiB images (qed: 4k random I/O and sequential read over the written half),\n' "$size_mb"
printf 'random runs %s s; median of 3 alternating runs; ratio imgmount/qsd, higher is better;\n' "$rand_runtime"
printf 'CPU: %% of one core used by the daemon during the runs, main thread / whole process\n'
printf '%-50s %9s %9s %6s %9s %9s\n' "workload" "imgmount" "qsd" "ratio" "CPU ours" "CPU qsd"
for r in "${rows[@]}"; do
  IFS='|' read -r name ours theirs oc tc <<<"$r"
  ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else print "n/a" }')
  printf '%-50s %9s %9s %6s %9s %9s\n' "$name" "$ours" "$theirs" "$ratio" "$oc" "$tc"
done
for n in "${notes[@]}"; do echo "$n"; done
if [ ${#rss_lines[@]} -gt 0 ]; then
  printf '\nmemory serving a 1 TiB qcow2 image (64 KiB of data every 4 GiB: 256 L2 tables), fio random read 4k,\n'
  printf '1 job, %s s over the whole 1 TiB (imgmount first, then qsd)\n' "$rss_runtime"
  printf '%-20s %11s %11s %11s %9s %9s\n' "daemon" "RSS before" "RSS after" "peak (HWM)" "IOPS" "CPU"
  for l in "${rss_lines[@]}"; do echo "$l"; done
fi
if [ ${#check_lines[@]} -gt 0 ]; then
  printf '\ncheck, whole command in ms (median of 3 alternating runs); ratio qemu-img/imgmount, higher is better\n'
  printf '%-30s %9s %9s %6s\n' "image" "imgmount" "qemu-img" "ratio"
  for l in "${check_lines[@]}"; do echo "$l"; done
fi
if [ ${#convert_lines[@]} -gt 0 ]; then
  printf '\nconvert of %s MiB images (half written), whole command in ms (median of 3 alternating runs); ratio qemu-img/imgmount, higher is better\n' "$size_mb"
  printf 'qemu-img as it runs by default (cache unsafe: DEST never flushed), and with -t writeback (DEST flushed\n'
  printf 'at the end, as imgmount does)\n'
  printf '%-30s %9s %9s %6s %9s %6s\n' "conversion" "imgmount" "qemu-img" "ratio" "-t wb" "ratio"
  for l in "${convert_lines[@]}"; do echo "$l"; done
fi
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
