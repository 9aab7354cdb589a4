#!/usr/bin/env bash
# Soak test of read-write mounts. Rounds of fio through imgmount mounts of a QED and a qcow2
# image (each over a backing file with data and holes), and between rounds a way down chosen at
# random, then a byte-exact check of everything that must have survived it.
#
# Usage: scripts/soak.sh [--minutes N | --seconds N] [--format qed|qcow2|both] [--seed S]
#                        [--size MIB] [--keep]
#   --minutes, --seconds  how long to start new rounds (default 10 minutes); the round under way
#                         when time is up is finished
#   --format   which images (default both: one daemon each, side by side)
#   --seed     seed of every random choice (default: a new one, printed first); the same seed
#              replays the same rounds, routes and fio jobs (not the same timings)
#   --size     virtual size of each image in MiB, a multiple of 4, at least 32 (default 128)
#   --keep     keep the work directory (images, references, logs, job files) at the end
# Needs fio, qemu-img, fusermount3 (or fusermount) and a built dist/ (npm run build); as root also
# the umount route. Ends with one line "N rounds, N failed", exit status 1 if any failed.
#
# A round, for each image: 2-4 fio write jobs, each on its own 4 MiB region (rw=randwrite, write,
# or write in strided zones; block sizes bsrange 512 B/4 KiB-1 MiB, bssplit, 4k or 1M; O_DIRECT or
# buffered; psync or libaio at iodepth 2-16; a quarter, half or all of the region; sometimes an
# fsync every N writes; --verify=crc32c or md5, --do_verify, end_fsync), one random-read job over
# the whole disk (no verify), and 0-2 fallocate punch-hole / zero-range calls on other regions,
# fsync'd. Then one way down per image:
#   unmount     imgmount unmount MOUNTPOINT
#   fusermount  fusermount3 -u MOUNTPOINT
#   umount      umount MOUNTPOINT (root only)
#   sigterm     kill -TERM of the daemon (it unmounts itself)
#   kill-idle   kill -9 of the daemon once the round's writes are done and fsync'd
#   kill-busy   kill -9 in the middle of the round, while fio writes (no verify): half the time
#               0.3-2.5 s into fio alone, half the time with a writer beside it whose every write
#               (dd, 512 B-100 KiB) is fdatasync'd and then logged as acknowledged, once 2-15
#               writes are acknowledged
# After a clean way the daemon must log "exiting with status 0"; after a kill the dead mount is
# removed with imgmount unmount. Then, unmounted:
#   - qemu-img check: exit 0 after a clean way; after a kill 0 or 3 (leaks), or 2 only for qcow2
#     with lazy refcounts while its dirty bit is set (refcounts may lag behind until the next
#     read-write open repairs them); leaks that no open will repair (no dirty / need-check bit) are
#     repaired with imgmount check -r leaks, which must leave qemu-img check at 0;
#   - qemu-img convert -O raw (qemu as the reader) is compared byte for byte with the reference,
#     qemu's reading after the previous round: the extents fio wrote (its write_iolog) may differ,
#     punched and zeroed ranges must read zeros, every acknowledged write must be there, the
#     regions a kill hit mid-write and the one write in flight may hold anything, and every other
#     byte (earlier rounds, the backing file, holes) must be unchanged; and fio --verify_only
#     replays the round's write jobs on qemu's copy (its checksums and block headers), so what fio
#     wrote and fsync'd is there. qemu's copy becomes the next reference;
#   - sometimes (qcow2, clean) qemu-img amend turns lazy_refcounts on or off;
#   - the image is mounted again: it must report a repair exactly when its dirty (qcow2) or
#     need-check (QED) bit is set, and the new mount must read exactly the reference.
# Every 15 rounds each image is unmounted cleanly, checked and replaced by a new one (geometry
# from the seed: QED clusters 4-64 KiB; qcow2 4 KiB, 64 KiB, or extended L2 with 16/64 KiB
# clusters, lazy refcounts on or off). A failure is reported with its details (the first one
# again at the end), and the run goes on from qemu's reading of the image (repaired by qemu-img
# check -r all when corrupt). Every command has a time limit, so a hang is a failure, not a stall.
# Why a byte reference rather than fio --verify_only of every earlier round: a later round
# overwrites parts of earlier rounds' regions, which then fail fio's replay, and fio's checks
# say nothing about bytes it did not write (gaps, backing data, COW around partial clusters,
# punched ranges); the reference checks all of them, and fio's replay checks each round's own.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=600 format=both seed='' size_mb=128 keep=0
usage() { sed -n '6,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) seconds=$(( ${2:?--minutes needs a number} * 60 )); shift 2 ;;
    --seconds) seconds=${2:?--seconds needs a number}; shift 2 ;;
    --format) format=${2:?--format needs qed, qcow2 or both}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --size) size_mb=${2:?--size needs a number of MiB}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) usage ;;
    *) echo "soak.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
case $format in qed) formats=(qed) ;; qcow2) formats=(qcow2) ;; both) formats=(qed qcow2) ;; *) echo "soak.sh: --format must be qed, qcow2 or both" >&2; exit 2 ;; esac
[[ $seconds =~ ^[0-9]+$ ]] || { echo "soak.sh: --seconds/--minutes must be a whole number" >&2; exit 2; }
[[ $size_mb =~ ^[0-9]+$ ]] && [ "$size_mb" -ge 32 ] && [ $((size_mb % 4)) = 0 ] || { echo "soak.sh: --size must be a multiple of 4, at least 32" >&2; exit 2; }
[ -n "$seed" ] || seed=$(( $(od -An -N4 -tu4 /dev/urandom) % 2147483647 ))
[[ $seed =~ ^[0-9]+$ ]] || { echo "soak.sh: --seed must be a number" >&2; exit 2; }
fusermount=$(command -v fusermount3 || command -v fusermount || true)
for tool in fio qemu-img timeout fallocate mountpoint node "$fusermount"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "soak.sh: ${tool:-fusermount3} is not installed (scripts/install-deps.sh)" >&2; echo "0 rounds, 1 failed"; exit 1; }
done
[ -f dist/cli/main.js ] || { echo "soak.sh: dist/ is missing: run npm run build" >&2; echo "0 rounds, 1 failed"; exit 1; }
imgmount=$PWD/bin/imgmount
routes=(unmount fusermount sigterm kill-idle kill-busy)
[ "$(id -u)" = 0 ] && routes+=(umount)

work=$(mktemp -d "${TMPDIR:-/var/tmp}/imgmount-soak-XXXXXX")
region=$((4 << 20)) regions=$((size_mb / 4)) size=$((size_mb << 20))
declare -A IMG MNT PID REF LAZY MOUNTS KILLED RESYNC ACKREG ACKW
bg_pids=()

cleanup() {
  local p f
  trap - EXIT INT TERM
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "${formats[@]}"; do
    [ -n "${MNT[$f]:-}" ] || continue
    if mountpoint -q "${MNT[$f]}" 2>/dev/null; then
      timeout 60 "$imgmount" unmount "${MNT[$f]}" >/dev/null 2>&1 || "$fusermount" -uz "${MNT[$f]}" 2>/dev/null || umount -l "${MNT[$f]}" 2>/dev/null || true
    fi
    if [ -n "${PID[$f]:-}" ] && alive "${PID[$f]}"; then kill -9 "${PID[$f]}" 2>/dev/null || true; fi
  done
  if [ $keep = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# pick N -> R in [0, N), from bash's RANDOM seeded with --seed (a function, not $(...), so that
# the sequence advances in this shell)
RANDOM=$seed
pick() { R=$(( ((RANDOM << 15) | RANDOM) % $1 )); }
# alive PID: running and not a zombie
alive() { [ -e "/proc/$1" ] && ! grep -q '^[^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
wait_gone() { local pid=$1 limit=$2 t=0; while alive "$pid"; do sleep 0.1; t=$((t + 1)); [ $t -lt $((limit * 10)) ] || return 1; done; }
daemon_pid() { sed -n 's/.*serving .* (pid \([0-9]*\)).*/\1/p' "$1" | tail -n 1; }
# dirty_flag IMAGE -> 1 when the qcow2 dirty bit (incompatible feature bit 0, byte 79) or the
# QED need-check bit (feature bit 1, byte 16) is set (qemu-img info does not show QED's)
dirty_flag() {
  case $1 in
    *.qed) echo $(( $(od -An -tu1 -j16 -N1 "$1") >> 1 & 1 )) ;;
    *) echo $(( $(od -An -tu1 -j79 -N1 "$1") & 1 )) ;;
  esac
}

# --- failures: every one is logged with its details; the first is printed again at the end
failures=0 round_failed=0 first_failure=''
fail() { # fail IMAGE WHAT [DETAILS FILE...]
  local f=$1 what=$2 text
  shift 2
  round_failed=1
  text="round $round, $f (route ${route[$f]:-none}): $what"
  echo "  FAILED: $text"
  {
    echo "$text"
    for file in "$@"; do [ -s "$file" ] && { echo "--- $(basename "$file"):"; tail -n 40 "$file"; }; done
  } >>"$work/failures.log"
  if [ -z "$first_failure" ]; then
    first_failure="$text (seed $seed)"
    for file in "$@"; do [ -s "$file" ] && first_failure+=$'\n'"--- $(basename "$file") (last 40 lines):"$'\n'"$(tail -n 40 "$file")"; done
  fi
  RESYNC[$f]=1
}
fatal() { fail "$@"; finish; }

# --- the byte comparison: compare OLD NEW SPEC [SRC]. Every byte of NEW must equal OLD, except
# the SPEC lines "mask OFFSET LENGTH" (anything), "zero OFFSET LENGTH" (zeros) and "src OFFSET
# LENGTH SRCOFFSET" (the bytes of SRC at SRCOFFSET); a later line wins where lines overlap.
cat >"$work/compare.mjs" <<'EOF'
import { open, readFile } from 'node:fs/promises';
const [oldPath, newPath, specPath, srcPath] = process.argv.slice(2);
const CHUNK = 1 << 20;
const spec = (await readFile(specPath, 'utf8')).split('\n').filter(Boolean).map((line, order) => {
  const [kind, offset, length, srcOffset] = line.split(' ');
  return { kind, offset: Number(offset), length: Number(length), srcOffset: Number(srcOffset ?? 0), order };
});
const [oldFile, newFile] = await Promise.all([open(oldPath, 'r'), open(newPath, 'r')]);
const src = srcPath ? await open(srcPath, 'r') : undefined;
const size = (await oldFile.stat()).size;
const newSize = (await newFile.stat()).size;
if (size !== newSize) { console.log(`${newPath} is ${newSize} bytes, ${oldPath} ${size}`); process.exit(1); }
const buckets = new Map();
for (const entry of spec) {
  for (let c = Math.floor(entry.offset / CHUNK); c * CHUNK < entry.offset + entry.length; c++) {
    if (!buckets.has(c)) buckets.set(c, []);
    buckets.get(c).push(entry);
  }
}
async function readFull(file, buffer, position) {
  for (let done = 0; done < buffer.length; ) {
    const { bytesRead } = await file.read(buffer, done, buffer.length - done, position + done);
    if (bytesRead === 0) throw new Error(`short read at ${position + done}`);
    done += bytesRead;
  }
}
const hex = (buffer, at) => [...buffer.subarray(at, at + 8)].map((b) => b.toString(16).padStart(2, '0')).join(' ');
const what = (offset) => {
  const hits = spec.filter((e) => e.offset <= offset && offset < e.offset + e.length);
  const last = hits[hits.length - 1];
  if (!last) return 'unchanged since the last check';
  if (last.kind === 'zero') return `zeros (punched or zeroed at ${last.offset} +${last.length})`;
  return `the acknowledged write at ${last.offset} +${last.length}`;
};
const expected = Buffer.alloc(CHUNK), actual = Buffer.alloc(CHUNK), runs = [];
let differing = 0;
for (let c = 0; c * CHUNK < size; c++) {
  const start = c * CHUNK, length = Math.min(CHUNK, size - start);
  const e = expected.subarray(0, length), a = actual.subarray(0, length);
  await Promise.all([readFull(oldFile, e, start), readFull(newFile, a, start)]);
  for (const entry of buckets.get(c) ?? []) {
    const from = Math.max(entry.offset, start) - start, to = Math.min(entry.offset + entry.length, start + length) - start;
    if (entry.kind === 'mask') a.copy(e, from, from, to);
    else if (entry.kind === 'zero') e.fill(0, from, to);
    else await readFull(src, e.subarray(from, to), entry.srcOffset + from + start - entry.offset);
  }
  if (e.equals(a)) continue;
  for (let i = 0; i < length; i++) {
    if (e[i] === a[i]) continue;
    let j = i;
    while (j < length && e[j] !== a[j]) j++;
    differing += j - i;
    if (runs.length < 5) runs.push(`at ${start + i} (${j - i} bytes): expected ${what(start + i)}: ${hex(e, i)}, read ${hex(a, i)}`);
    i = j;
  }
}
if (differing === 0) process.exit(0);
console.log(`${differing} bytes differ; first runs:\n  ${runs.join('\n  ')}`);
process.exit(1);
EOF
compare() { node "$work/compare.mjs" "$@"; }

# qed_refs IMAGE -> "UNREFERENCED DOUBLE": clusters of a QED file that nothing references, and
# clusters referenced twice, from its tables. A second opinion on leaks: qemu-img 7.2's check
# reports leaked clusters in 4 KiB-cluster QED images that have none (also in images only
# qemu-io wrote: 1 with 2 L2 tables, 2 with 5), so its exit 3 alone is not believed there.
cat >"$work/qed-refs.mjs" <<'EOF'
import { readFile } from 'node:fs/promises';
const f = await readFile(process.argv[2]);
const clusterSize = f.readUInt32LE(4), tableBytes = f.readUInt32LE(8) * clusterSize, headerClusters = f.readUInt32LE(12);
const l1 = Number(f.readBigUInt64LE(40));
const refs = new Uint8Array(Math.ceil(f.length / clusterSize));
let double = 0;
const use = (offset, length) => {
  for (let c = offset / clusterSize; c < (offset + length) / clusterSize; c++) if (c < refs.length && refs[c]++ > 0) double++;
};
use(0, headerClusters * clusterSize);
use(l1, tableBytes);
for (let i = 0; i < tableBytes / 8; i++) {
  const l2 = Number(f.readBigUInt64LE(l1 + i * 8));
  if (l2 === 0 || l2 + tableBytes > f.length) continue;
  use(l2, tableBytes);
  for (let j = 0; j < tableBytes / 8; j++) {
    const data = Number(f.readBigUInt64LE(l2 + j * 8));
    if (data > 1 && data % clusterSize === 0) use(data, clusterSize); // 1: a zero cluster
  }
}
console.log(refs.filter((n) => n === 0).length, double);
EOF
# fio_errors JOBFILE -> JOBFILE.errors: fio's messages (stderr) and the jobs that ended with an error
fio_errors() {
  { cat "$1.err" 2>/dev/null; grep -E '^[a-z0-9]+: \(groupid=.*err= *[1-9]' "$1.out" 2>/dev/null; } | head -n 30 >"$1.errors" || true
}

# --- images: QED over a raw backing file, qcow2 over a qcow2 one; backing files 3/4 of the size,
# random data in every other MiB (holes between), created with the seed's geometry
make_image() {
  local f=$1 mb=$((size_mb * 3 / 4)) k opts
  head -c $((mb / 2 + 1))M /dev/urandom >"$work/random.src"
  truncate -s "${mb}M" "$work/$f-base.raw"
  for k in $(seq 0 2 $((mb - 1))); do
    dd if="$work/random.src" of="$work/$f-base.raw" bs=1M skip=$((k / 2)) seek="$k" count=1 conv=notrunc status=none
  done
  rm -f "$work/random.src"
  IMG[$f]=$work/disk.$f MNT[$f]=$work/mnt-$f REF[$f]=$work/$f-ref.raw MOUNTS[$f]=${MOUNTS[$f]:-0} KILLED[$f]=0 RESYNC[$f]=0
  mkdir -p "${MNT[$f]}"
  if [ "$f" = qed ]; then
    pick 3; opts=cluster_size=$(( (4096 << (R * 2)) ))   # 4, 16 or 64 KiB
    qemu-img create -q -f qed -o "$opts" -b "$work/$f-base.raw" -F raw "${IMG[$f]}" "${size_mb}M"
    LAZY[$f]=0
  else
    qemu-img convert -O qcow2 -f raw "$work/$f-base.raw" "$work/$f-base.qcow2"
    rm -f "$work/$f-base.raw"
    pick 4; case $R in 0) opts=cluster_size=4096 ;; 1) opts=cluster_size=65536 ;; 2) opts=cluster_size=65536,extended_l2=on ;; 3) opts=cluster_size=16384,extended_l2=on ;; esac
    pick 2; LAZY[$f]=$R
    [ "$R" = 1 ] && opts+=,lazy_refcounts=on
    qemu-img create -q -f qcow2 -o "compat=1.1,$opts" -b "$work/$f-base.qcow2" -F qcow2 "${IMG[$f]}" "${size_mb}M"
  fi
  qemu-img convert -O raw "${IMG[$f]}" "${REF[$f]}"
  echo "$f: ${IMG[$f]} (${size_mb} MiB, $opts) over a ${mb} MiB backing file"
}

mount_image() { # mount_image F -> sets PID[F]; the open's notices in $work/$f-mount.out
  local f=$1 log rc=0
  MOUNTS[$f]=$((MOUNTS[$f] + 1))
  log=$work/$f-mount-${MOUNTS[$f]}.log
  timeout 300 "$imgmount" --log "$log" "${IMG[$f]}" "${MNT[$f]}" >"$work/$f-mount.out" 2>&1 || rc=$?
  if [ $rc != 0 ]; then fatal "$f" "imgmount ${IMG[$f]} ${MNT[$f]} exited $rc" "$work/$f-mount.out" "$log"; fi
  PID[$f]=$(daemon_pid "$log")
  [ -n "${PID[$f]}" ] || fatal "$f" "no 'serving ... (pid N)' line in the daemon's log" "$log"
}
daemon_log() { echo "$work/$1-mount-${MOUNTS[$1]}.log"; }

# --- one round's plan for an image: fio job files (the run and its verify-only replay), punches
plan_round() { # plan_round F BUSY -> $work/r-$f.fio, $work/r-$f.verify.fio, $work/r-$f.punches, ACKREG[F]
  local f=$1 busy=$2 order=() i j t njobs kind rw jobsize bs direct engine engine_note share extra verify randseed summary=()
  for ((i = 0; i < regions; i++)); do order+=("$i"); done
  for ((i = regions - 1; i > 0; i--)); do pick $((i + 1)); j=$R; t=${order[i]}; order[i]=${order[j]}; order[j]=$t; done
  pick 3; njobs=$((2 + R))
  printf '[global]\nfilename=%s\nrandrepeat=1\nverify_state_save=0\n' "${MNT[$f]}/disk.raw" >"$work/r-$f.fio"
  printf '[global]\nfilename=%s\nrandrepeat=1\nverify_state_save=0\nverify_only=1\n' "$work/$f-new.raw" >"$work/r-$f.verify.fio"
  rm -f "$work"/r-"$f"-w*.iolog "$work/r-$f.jobregions"
  for ((j = 0; j < njobs; j++)); do
    pick 10
    case $R in
      [0-4]) kind=randwrite rw=randwrite ;;
      [5-7]) kind=write rw=write ;;
      *) pick 3; kind="write, gaps of $((64 << (R * 2)))k"; rw=write:$((64 << (R * 2)))k ;; # (zonemode=strided ignores size)
    esac
    jobsize=$region
    [ "$rw" = write ] || [ "$rw" = randwrite ] || jobsize=$((region - (1 << 20))) # write:SKIP's last block may cross size
    pick 2; direct=$R
    pick 5
    case $R in
      0) bs=bsrange=4k-1M ;; 1) bs=bssplit=4k/40:16k/20:64k/20:256k/10:1M/10 ;; 2) bs=bs=4k ;; 3) bs=bs=1M ;;
      4) if [ $direct = 1 ]; then bs=bsrange=4k-256k; else bs=bsrange=512-256k; fi ;;
    esac
    engine=ioengine=psync engine_note=''
    if [ $direct = 1 ]; then pick 2; [ $R = 1 ] && { pick 4; engine="ioengine=libaio iodepth=$((2 << R))" engine_note=" libaio qd$((2 << R))"; }; fi
    pick 4; case $R in 0) share=$((jobsize / 4)) ;; 1) share=$((jobsize / 2)) ;; *) share=$jobsize ;; esac
    extra=''
    pick 4; [ $R = 0 ] && { pick 4; extra="fsync=$((8 << R))"; }
    pick 4; verify=crc32c; [ $R = 0 ] && verify=md5
    pick 2147483647; randseed=$((R + 1))
    {
      echo "[w$j]"
      for opt in rw=$rw "$bs" direct=$direct $engine offset=$((order[j] * region)) size=$jobsize randseed=$randseed $extra; do echo "$opt"; done
      if [ "$busy" = 1 ]; then
        printf 'time_based=1\nruntime=120\n'
      else
        printf 'io_size=%s\nend_fsync=1\nverify=%s\ndo_verify=1\nverify_fatal=1\n' $share $verify
      fi
    } >"$work/r-$f-w$j.job"
    cat "$work/r-$f-w$j.job" >>"$work/r-$f.fio"
    [ "$busy" = 1 ] || echo "write_iolog=$work/r-$f-w$j.iolog" >>"$work/r-$f.fio"
    cat "$work/r-$f-w$j.job" >>"$work/r-$f.verify.fio"
    echo "mask $((order[j] * region)) $region" >>"$work/r-$f.regions"
    echo "w$j $((order[j] * region))" >>"$work/r-$f.jobregions"
    summary+=("$kind ${bs#*=} $([ $direct = 1 ] && echo direct || echo buffered)$engine_note${extra:+ $extra}$([ "$busy" = 1 ] || echo " $((share >> 20))M $verify")")
  done
  pick 2
  printf '[r0]\nrw=randread\nbsrange=4k-1M\ndirect=%s\nio_size=%s\nverify=0\n' "$R" $((8 << 20)) >>"$work/r-$f.fio"
  # punches and zeroings, on regions no job writes
  : >"$work/r-$f.punches"
  pick 3
  for ((i = 0; i < R; i++)); do
    local p=${order[njobs + i]} off len mode
    pick $(( (region - (1 << 20)) / 512 )); off=$((p * region + R * 512))
    pick 2048; len=$(( (R + 8) * 512 ))
    pick 2; mode=$([ $R = 0 ] && echo -p || echo -z)
    echo "$mode $off $len" >>"$work/r-$f.punches"
  done
  ACKREG[$f]=${order[njobs + 2]}
  job_summary[$f]=$(printf '%s; ' "${summary[@]}")
}

# The acknowledged writer of a kill-busy round: 32 slots of the ack region in a shuffled order,
# each a dd of 512 B-100 KiB of random data, fdatasync'd, logged "start" before and "done" after.
ack_writer() { # ack_writer F REGION SLOTS...
  local f=$1 base=$(($2 * region)) slot off len
  shift 2
  for slot in "$@"; do
    off=$((base + slot * 131072 + (slot % 7) * 512)) len=${slot_len[$slot]}
    echo "start $off $len" >>"$work/r-$f.acks"
    dd if="$work/$f-ack.src" of="${MNT[$f]}/disk.raw" iflag=skip_bytes,count_bytes oflag=seek_bytes skip=$((off - base)) seek=$off \
      bs="$len" count="$len" conv=notrunc,fdatasync status=none 2>/dev/null || return 0
    echo "done $off $len $((off - base))" >>"$work/r-$f.acks"
  done
}

# --- counters for the summary
declare -A count
bump() { count[$1]=$(( ${count[$1]:-0} + 1 )); }

finish() {
  local k line=''
  failures=$((failures + round_failed)) round_failed=0
  for k in "${routes[@]}"; do line+=" $k ${count[route-$k]:-0},"; done
  echo
  echo "seed $seed, $round rounds in $((SECONDS - start)) s; ways down:${line%,}"
  line=''
  for k in "${!count[@]}"; do [[ $k == check-* ]] && line+=" ${k#check-} ${count[$k]},"; done
  echo "qemu-img check exit statuses:${line%,}; repairs at mount ${count[repair]:-0}, imgmount check -r leaks ${count[leak-repair]:-0}, lazy_refcounts toggled ${count[amend]:-0}, images renewed ${count[renew]:-0}, QED leak reports of qemu-img not believed ${count[qemu-leak-miscount]:-0}; kill-busy with fio alone ${count[fio-only-kill]:-0}, acknowledged writes checked ${count[acked]:-0}"
  if [ -n "$first_failure" ]; then echo; echo "first failure: $first_failure"; fi
  echo "$round rounds, $failures failed"
  [ "$failures" = 0 ] && exit 0 || exit 1
}

# qemu_leak_miscount F IMAGE CHECKLOG: for QED, qemu-img's "leaks only" (rc 3) becomes rc 0 when
# qed-refs.mjs finds no unreferenced and no doubly referenced cluster (noted in CHECKLOG)
qemu_leak_miscount() {
  local unreferenced double
  [ "$1" = qed ] && [ "$rc" = 3 ] || return 0
  read -r unreferenced double < <(node "$work/qed-refs.mjs" "$2")
  if [ "$unreferenced" = 0 ] && [ "$double" = 0 ]; then
    echo "(qemu-img's leak count not believed: every cluster of the file is referenced once)" >>"$3"
    bump qemu-leak-miscount
    rc=0
  fi
}

# Every RENEW_EVERY rounds each image is unmounted cleanly (qemu-img check must be clean), and
# replaced by a new one with a new geometry from the seed, so a long run covers several.
RENEW_EVERY=15
renew_image() {
  local f=$1 rc=0 status
  route[$f]=renew
  timeout 120 "$imgmount" unmount "${MNT[$f]}" >"$work/r-$f.down" 2>&1 || rc=$?
  [ $rc = 0 ] || fail "$f" "imgmount unmount before renewing exited $rc" "$work/r-$f.down"
  wait_gone "${PID[$f]}" 60 || fatal "$f" "the daemon (pid ${PID[$f]}) still runs 60 s after imgmount unmount"
  status=$(sed -n 's/.*exiting with status \([0-9]*\).*/\1/p' "$(daemon_log "$f")" | tail -n 1)
  [ "$status" = 0 ] || fail "$f" "the daemon ended with status '${status:-none logged}'" "$(daemon_log "$f")"
  rc=0; timeout 300 qemu-img check "${IMG[$f]}" >"$work/r-$f.check" 2>&1 || rc=$?
  qemu_leak_miscount "$f" "${IMG[$f]}" "$work/r-$f.check"
  [ $rc = 0 ] || fail "$f" "qemu-img check exited $rc before renewing" "$work/r-$f.check"
  rm -f "${IMG[$f]}" "${REF[$f]}" "$work/$f-base.raw" "$work/$f-base.qcow2"
  bump renew
  make_image "$f"
  mount_image "$f"
}

start=$SECONDS round=0
declare -A route job_summary fio_pid ack_pid check_note ack_note
echo "soak: seed $seed, ${seconds} s, ${formats[*]}, work directory $work"
for f in "${formats[@]}"; do make_image "$f"; done
for f in "${formats[@]}"; do mount_image "$f"; done

while [ $((SECONDS - start)) -lt "$seconds" ]; do
  round=$((round + 1)) round_failed=0
  if [ $((round % RENEW_EVERY)) = 1 ] && [ $round -gt 1 ]; then
    for f in "${formats[@]}"; do renew_image "$f"; done
  fi
  for f in "${formats[@]}"; do
    pick ${#routes[@]}; route[$f]=${routes[R]}
    ACKW[$f]=0; [ "${route[$f]}" = kill-busy ] && { pick 2; ACKW[$f]=$R; }
    busy=0; [ "${route[$f]}" = kill-busy ] && busy=1
    rm -f "$work/r-$f.regions" "$work/r-$f.acks"
    plan_round "$f" $busy
  done

  # run: fio for every image side by side, punches, and the kill of a busy round
  for f in "${formats[@]}"; do
    (cd "$work" && exec timeout -k 10 600 fio "$work/r-$f.fio" --output="$work/r-$f.fio.out" >/dev/null 2>"$work/r-$f.fio.err") &
    fio_pid[$f]=$!; bg_pids+=($!)
  done
  for f in "${formats[@]}"; do
    while read -r mode off len; do
      if ! fallocate "$mode" -o "$off" -l "$len" "${MNT[$f]}/disk.raw" 2>"$work/r-$f.punch.err"; then
        fail "$f" "fallocate $mode -o $off -l $len failed" "$work/r-$f.punch.err"
      else
        echo "zero $off $len" >>"$work/r-$f.regions"
      fi
    done <"$work/r-$f.punches"
    if [ -s "$work/r-$f.punches" ] && ! dd if=/dev/null of="${MNT[$f]}/disk.raw" conv=notrunc,fsync status=none 2>"$work/r-$f.punch.err"; then
      fail "$f" "fsync after the punches failed" "$work/r-$f.punch.err"
    fi
    if [ "${route[$f]}" = kill-busy ] && [ "${ACKW[$f]}" = 1 ]; then
      [ -f "$work/$f-ack.src" ] || head -c $region /dev/urandom >"$work/$f-ack.src"
      slots=() slot_len=()
      for ((i = 0; i < 32; i++)); do slots+=("$i"); pick 200; slot_len[i]=$(( (R + 1) * 512 )); done
      for ((i = 31; i > 0; i--)); do pick $((i + 1)); t=${slots[i]}; slots[i]=${slots[R]}; slots[R]=$t; done
      : >"$work/r-$f.acks"
      ack_writer "$f" "${ACKREG[$f]}" "${slots[@]}" &
      ack_pid[$f]=$!; bg_pids+=($!)
    fi
  done
  for f in "${formats[@]}"; do
    [ "${route[$f]}" = kill-busy ] || continue
    if [ "${ACKW[$f]}" = 1 ]; then
      # once 2-15 writes are acknowledged, and up to 0.4 s later
      pick 14; want=$((2 + R)); t=0
      while [ "$(grep -c '^done' "$work/r-$f.acks" 2>/dev/null || true)" -lt $want ] && kill -0 "${ack_pid[$f]}" 2>/dev/null && [ $t -lt 600 ]; do sleep 0.05; t=$((t + 1)); done
      pick 400; sleep "$(printf '0.%03d' "$R")"
    else
      # fio alone (no fsync from anyone but fio's own fsync=N): 0.3-2.5 s into the round
      pick 2200; sleep "$(printf '%d.%03d' $(( (R + 300) / 1000 )) $(( (R + 300) % 1000 )))"
    fi
    kill -9 "${PID[$f]}"
  done
  for f in "${formats[@]}"; do
    rc=0; wait "${fio_pid[$f]}" || rc=$?
    if [ "${route[$f]}" = kill-busy ]; then
      [ "${ACKW[$f]}" = 0 ] || wait "${ack_pid[$f]}" || true
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
      fatal "$f" "fio did not finish in 600 s (a hang?)" "$work/r-$f.fio" "$work/r-$f.fio.out" "$(daemon_log "$f")"
    elif [ $rc != 0 ]; then
      fio_errors "$work/r-$f.fio"
      fail "$f" "fio exited $rc (its verify or an I/O error)" "$work/r-$f.fio.errors" "$work/r-$f.fio" "$(daemon_log "$f")"
    fi
  done

  # ways down
  for f in "${formats[@]}"; do
    pid=${PID[$f]} rc=0 mnt=${MNT[$f]}
    bump "route-${route[$f]}"
    [ "${route[$f]}" != kill-busy ] || [ "${ACKW[$f]}" = 1 ] || bump fio-only-kill
    case ${route[$f]} in
      unmount) timeout 120 "$imgmount" unmount "$mnt" >"$work/r-$f.down" 2>&1 || rc=$? ;;
      fusermount) timeout 60 "$fusermount" -u "$mnt" >"$work/r-$f.down" 2>&1 || rc=$? ;;
      umount) timeout 60 umount "$mnt" >"$work/r-$f.down" 2>&1 || rc=$? ;;
      sigterm) kill -TERM "$pid" ;;
      kill-idle) kill -9 "$pid" ;;
    esac
    [ $rc = 0 ] || fail "$f" "${route[$f]} exited $rc" "$work/r-$f.down"
    if ! wait_gone "$pid" 60; then
      fail "$f" "the daemon (pid $pid) still runs 60 s after ${route[$f]}" "$(daemon_log "$f")"
      kill -9 "$pid" 2>/dev/null || true
      route[$f]=kill-idle
      wait_gone "$pid" 10 || fatal "$f" "the daemon (pid $pid) survives kill -9"
    fi
    KILLED[$f]=0
    case ${route[$f]} in
      kill-*)
        KILLED[$f]=1
        rc=0; timeout 60 "$imgmount" unmount "$mnt" >"$work/r-$f.down" 2>&1 || rc=$?
        [ $rc = 0 ] || fail "$f" "imgmount unmount of the dead mount exited $rc" "$work/r-$f.down"
        ;;
      *)
        status=$(sed -n 's/.*exiting with status \([0-9]*\).*/\1/p' "$(daemon_log "$f")" | tail -n 1)
        [ "$status" = 0 ] || fail "$f" "the daemon ended with status '${status:-none logged}' after ${route[$f]}" "$(daemon_log "$f")"
        ;;
    esac
    if mountpoint -q "$mnt"; then
      fail "$f" "$mnt is still mounted after ${route[$f]}"
      umount -l "$mnt" 2>/dev/null || "$fusermount" -uz "$mnt" 2>/dev/null || true
    fi
  done

  # checks, unmounted, then the mount again
  for f in "${formats[@]}"; do
    img=${IMG[$f]} new=$work/$f-new.raw rc=0
    timeout 300 qemu-img check "$img" >"$work/r-$f.check" 2>&1 || rc=$?
    qemu_leak_miscount "$f" "$img" "$work/r-$f.check"
    dirty=$(dirty_flag "$img")
    bump "check-$rc$([ "$dirty" = 1 ] && echo ' (dirty)' || true)"
    if [ "${KILLED[$f]}" = 0 ]; then
      [ $rc = 0 ] && [ "$dirty" = 0 ] || fail "$f" "qemu-img check exited $rc (dirty bit $dirty) after a clean ${route[$f]}" "$work/r-$f.check"
    elif [ $rc = 2 ] && [ "$f" = qcow2 ] && [ "${LAZY[$f]}" = 1 ] && [ "$dirty" = 1 ]; then
      : # lazy refcounts, dirty: the next read-write open rebuilds the refcounts
    elif [ $rc != 0 ] && [ $rc != 3 ]; then
      fail "$f" "qemu-img check exited $rc after kill -9 (2: corruption)" "$work/r-$f.check"
    fi
    if [ "${RESYNC[$f]}" = 1 ] && [ $rc = 2 ] && ! { [ "$f" = qcow2 ] && [ "${LAZY[$f]}" = 1 ] && [ "$dirty" = 1 ]; }; then
      # a corruption found is reported once: qemu-img repairs it so that later rounds start clean
      qemu-img check -r all "$img" >>"$work/r-$f.check" 2>&1 || true
      rc=0; qemu-img check "$img" >/dev/null 2>&1 || rc=$?
      dirty=$(dirty_flag "$img")
    fi

    # qemu's reading against the reference
    rc2=0; timeout 300 qemu-img convert -O raw "$img" "$new" 2>"$work/r-$f.convert" || rc2=$?
    [ $rc2 = 0 ] || fatal "$f" "qemu-img convert exited $rc2" "$work/r-$f.convert"
    spec=$work/r-$f.spec
    : >"$spec"
    if [ "${route[$f]}" = kill-busy ]; then
      grep '^mask' "$work/r-$f.regions" >>"$spec" || true
      grep '^zero' "$work/r-$f.regions" >>"$spec" || true
      # acknowledged writes must be there; the one in flight may hold anything
      [ "${ACKW[$f]}" = 0 ] || awk '$1 == "start" { s[$2] = $3 } $1 == "done" { delete s[$2]; print "src", $2, $3, $4 } END { for (o in s) print "mask", o, s[o] }' \
        "$work/r-$f.acks" >>"$spec" 2>/dev/null || true
      count[acked]=$(( ${count[acked]:-0} + $(grep -c '^src' "$spec" || true) ))
      ack_note[$f]=$([ "${ACKW[$f]}" = 1 ] && echo " ($(grep -c '^src' "$spec" || true) acknowledged writes)" || echo " (fio only)")
    else
      cat "$work"/r-"$f"-w*.iolog 2>/dev/null | awk '$(NF - 2) == "write" { print "mask", $(NF - 1), $NF }' >>"$spec"
      # the comparison relies on every job keeping to its region: a write outside is this script's bug
      while read -r job base; do
        awk -v lo="$base" -v hi=$((base + region)) '$(NF - 2) == "write" && ($(NF - 1) < lo || $(NF - 1) + $NF > hi) { print; exit 1 }' \
          "$work/r-$f-$job.iolog" >"$work/r-$f.outside" ||
          fail "$f" "soak.sh bug, not imgmount's: fio job $job wrote outside its region [$base, $((base + region)))" "$work/r-$f.outside" "$work/r-$f-$job.job"
      done <"$work/r-$f.jobregions"
      grep '^zero' "$work/r-$f.regions" >>"$spec" || true
      ack_note[$f]=''
    fi
    if [ "${RESYNC[$f]}" = 1 ]; then
      RESYNC[$f]=0 # after a failure, qemu's reading becomes the reference again
    elif ! compare "${REF[$f]}" "$new" "$spec" $([ "${ACKW[$f]}" = 1 ] && echo "$work/$f-ack.src") >"$work/r-$f.compare" 2>&1; then
      fail "$f" "the image read by qemu-img differs from what was written${ack_note[$f]}" "$work/r-$f.compare" "$work/r-$f.fio"
    fi
    if [ "${route[$f]}" != kill-busy ] && ! (cd "$work" && timeout 300 fio "$work/r-$f.verify.fio" --output="$work/r-$f.verify.fio.out" >/dev/null 2>"$work/r-$f.verify.fio.err"); then
      fio_errors "$work/r-$f.verify.fio"
      fail "$f" "fio --verify_only of the round's writes on qemu-img's copy failed (fsync'd data lost or damaged)" "$work/r-$f.verify.fio.errors" "$work/r-$f.verify.fio"
    fi
    mv "$new" "${REF[$f]}"

    # leaks no open would repair (no dirty / need-check bit): imgmount check -r leaks
    if [ $rc = 3 ] && [ "$dirty" = 0 ]; then
      bump leak-repair
      rc2=0; timeout 300 "$imgmount" check -r leaks "$img" >"$work/r-$f.repair" 2>&1 || rc2=$?
      rc3=0; qemu-img check "$img" >>"$work/r-$f.repair" 2>&1 || rc3=$?
      [ $rc2 = 0 ] && [ $rc3 = 0 ] || fail "$f" "imgmount check -r leaks exited $rc2, qemu-img check then $rc3" "$work/r-$f.check" "$work/r-$f.repair"
    fi
    if [ "$f" = qcow2 ] && [ $rc = 0 ] && [ "$dirty" = 0 ]; then
      pick 3
      if [ $R = 0 ]; then
        LAZY[$f]=$((1 - LAZY[$f])); bump amend
        qemu-img amend -o lazy_refcounts=$([ "${LAZY[$f]}" = 1 ] && echo on || echo off) "$img" 2>"$work/r-$f.amend" || fail "$f" "qemu-img amend failed" "$work/r-$f.amend"
      fi
    fi

    mount_image "$f"
    if grep -q 'not closed cleanly' "$work/$f-mount.out"; then
      bump repair
      [ "$dirty" = 1 ] || fail "$f" "the mount repaired an image whose dirty / need-check bit was clear" "$work/$f-mount.out"
    elif [ "$dirty" = 1 ]; then
      fail "$f" "the dirty / need-check bit was set but the mount reported no repair" "$work/$f-mount.out"
    fi
    : >"$work/empty.spec"
    if ! compare "${REF[$f]}" "${MNT[$f]}/disk.raw" "$work/empty.spec" >"$work/r-$f.mcompare" 2>&1; then
      fail "$f" "the new mount reads differently from qemu-img" "$work/r-$f.mcompare" "$(daemon_log "$f")"
    fi
    check_note[$f]="check $rc$([ "$dirty" = 1 ] && echo ' dirty' || true)"
  done

  line="round $round ($((SECONDS - start)) s):"
  for f in "${formats[@]}"; do
    line+=" $f$([ "$f" = qcow2 ] && [ "${LAZY[$f]}" = 1 ] && echo ' lazy' || true): ${route[$f]}${ack_note[$f]}, ${check_note[$f]};"
    echo "round $round $f: ${job_summary[$f]}$(wc -l <"$work/r-$f.punches") punches; ${route[$f]}${ack_note[$f]}, ${check_note[$f]}" >>"$work/rounds.log"
  done
  echo "${line%;}: $([ $round_failed = 0 ] && echo ok || echo FAILED)"
  failures=$((failures + round_failed)) round_failed=0
done
finish
