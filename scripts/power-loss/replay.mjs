/**
 * The power-loss replay: rebuilds, from one workload run (workload.mjs), the
 * image-file states a power loss could have left, and checks each.
 *
 * Which states are legal (the log's rules, src/block/filters/write-log.ts):
 * a request (write, truncate, punch) takes effect at some moment between its
 * issue record and its end record; a flush that ended makes durable every
 * request that ended before the flush was issued. So for a cut before record
 * P (a power loss at that moment):
 *   barrier   the latest issue record of a flush that ended before P;
 *   durable   the requests that ended before the barrier: all applied;
 *   optional  every other request issued before P (ended after the barrier,
 *             still in flight at P, or failed): any subset may have reached
 *             the disk, and a write only some of its 4 KiB pages (page-cache
 *             writeback), applied in issue order.
 * A state is a cut and a choice among its optional requests, one of: the
 * plain prefix (every request that ended before P, as dm-log-writes'
 * replay-log gives), none of them, a random subset of whole requests, or a
 * random subset with writes torn at 4 KiB pages. Cuts fall just before a
 * request's record (after any marks and events that precede it, which change
 * nothing on disk and only make the expectations stricter); identical states
 * are built once.
 *
 * The checks for a state whose last "ack N" mark comes before the cut:
 *   - a header marked corrupt fails; one not marked need-check / dirty must
 *     pass `qemu-img check` as it is (exit 0, or 3 where leaks are allowed);
 *   - imgmount opens it read-write (repairing it if marked) and every guest
 *     byte reads as the disk after batches 1..N, except the ranges batch N+1
 *     wrote (its writes may be in flight): there each 512-byte piece of a
 *     write reads either as before or as written;
 *   - after imgmount closed it, `qemu-img check` exits 0, or 3 (leaks only)
 *     where a crash may leave leaks: a qcow2 image not marked dirty (without
 *     lazy refcounts, refcounts are raised before the L2 entries are written),
 *     a QED image marked need-check (the repair cuts leaked clusters off the
 *     end of the file; QED cannot reuse the ones in the middle). A qcow2
 *     image repaired from its dirty bit has rebuilt refcounts: no leaks.
 *
 * Building: states are taken in cut order over one base file that holds the
 * durable requests (they only grow with the cut); each state is a copy of the
 * base plus its optional requests. Building is sequential, checking runs
 * `jobs` states at a time.
 */
import { execFile } from 'node:child_process';
import { copyFile, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Random, headerState, opData } from './common.mjs';

const { openImage, parseWriteLog } = await import('../../dist/index.js');

const MODIFYING = new Set(['write', 'truncate', 'punch']);
const PAGE = 4096;

/**
 * Replays one run in `dir`: `count` states (fewer only if the run has fewer
 * distinct ones). Returns counts, statistics and the first failure's report.
 */
export async function replayRun({ dir, count, seed, jobs = 2, keep = false }) {
  const workload = JSON.parse(await readFile(join(dir, 'workload.json'), 'utf8'));
  const log = parseWriteLog(await readFile(join(dir, 'writes.log')), join(dir, 'writes.log'));
  const run = analyze(log, workload);
  const states = chooseStates(run, count, new Random(seed));
  const result = { checked: 0, failed: 0, firstFailure: undefined, records: log.records.length, requests: run.ops.size, stats: { repaired: 0, leaksBefore: 0, leaksAfter: 0 }, overlaps: run.overlaps };
  const expected = new ExpectedDisk(await readFile(join(dir, 'guest-0.raw')), workload.batches);
  const base = join(dir, 'base.img');
  await copyFile(join(dir, 'initial.img'), base);
  const baseApplied = new Set();
  const running = new Set();
  for (const [number, state] of states.entries()) {
    // Bring the base up to this state's durable requests, then copy it: only while no copy is being made.
    const newlyDurable = durableOps(run, state.barrier).filter((op) => !baseApplied.has(op.id));
    if (newlyDurable.length > 0) {
      await withFile(base, (handle) => applyOps(handle, newlyDurable.map((op) => ({ op }))));
      for (const op of newlyDurable) baseApplied.add(op.id);
    }
    const path = join(dir, `state-${number}.img`);
    await copyFile(base, path);
    await withFile(path, (handle) => applyOps(handle, state.chosen));
    const check = (async () => {
      const problem = await checkState(path, workload, state, expected.at(state.lastAck), result.stats);
      result.checked += 1;
      if (problem) {
        result.failed += 1;
        if (!result.firstFailure) {
          result.firstFailure = describe(run, workload, state, number, states.length, problem);
          if (keep) {
            await copyFile(path, join(dir, 'failed-state-after-open.img'));
            await buildFromScratch(run, state, dir, join(dir, 'failed-state.img'));
          }
        }
      }
      await rm(path, { force: true });
    })();
    running.add(check);
    void check.finally(() => running.delete(check));
    if (running.size >= jobs) await Promise.race(running);
  }
  await Promise.all(running);
  await rm(base, { force: true });
  return result;
}

/** Builds a state from the initial image alone (the base has moved on by then): for a kept failure. */
async function buildFromScratch(run, state, dir, target) {
  await copyFile(join(dir, 'initial.img'), target);
  await withFile(target, async (handle) => {
    await applyOps(handle, durableOps(run, state.barrier).map((op) => ({ op })));
    await applyOps(handle, state.chosen);
  });
}

/** Requests by id, the candidate cuts, and where the acks are. */
function analyze(log, workload) {
  const ops = new Map();
  const acks = [];
  const batchStarts = [];
  const cuts = [];
  for (const record of log.records) {
    if (record.kind === 'mark') {
      const match = /^(ack|batch) (\d+)$/.exec(record.name);
      if (match?.[1] === 'ack') acks.push({ batch: Number(match[2]), index: record.index });
      if (match?.[1] === 'batch') batchStarts.push({ batch: Number(match[2]), index: record.index });
      continue;
    }
    if (record.kind === 'event') continue;
    cuts.push(record.index);
    if (record.phase === 'issued') {
      ops.set(record.id, { id: record.id, kind: record.kind, issue: record.index, end: Infinity, ok: false, offset: record.offset, length: record.length, data: record.data });
    } else {
      const op = ops.get(record.id);
      if (!op) throw new Error(`record ${record.index}: end of request ${record.id}, which was never issued`);
      op.end = record.index;
      op.ok = record.phase === 'ended';
    }
  }
  cuts.push(log.records.length);
  const modifying = [...ops.values()].filter((op) => MODIFYING.has(op.kind)).sort((a, b) => a.issue - b.issue);
  const flushes = [...ops.values()].filter((op) => op.kind === 'flush' && op.ok).sort((a, b) => a.end - b.end);
  return { log, workload, ops, modifying, flushes, acks, batchStarts, cuts, overlaps: overlappingWrites(modifying) };
}

/** The barrier of a cut: the issue record of the latest-issued flush that ended before it (-1: none). */
function barrierAt(run, cut) {
  let barrier = -1;
  for (const flush of run.flushes) {
    if (flush.end >= cut) break;
    barrier = Math.max(barrier, flush.issue);
  }
  return barrier;
}

function durableOps(run, barrier) {
  return run.modifying.filter((op) => op.ok && op.end < barrier);
}

function optionalOps(run, cut, barrier) {
  return run.modifying.filter((op) => op.issue < cut && !(op.ok && op.end < barrier));
}

/** Picks up to `count` distinct states, sorted by cut. */
function chooseStates(run, count, random) {
  const states = new Map();
  for (let attempt = 0; states.size < count && attempt < count * 30; attempt++) {
    // The end of the log (the run as it finished) first, then random cuts.
    const cut = attempt === 0 ? run.cuts[run.cuts.length - 1] : run.cuts[random.int(0, run.cuts.length - 1)];
    const barrier = barrierAt(run, cut);
    const optional = optionalOps(run, cut, barrier);
    const roll = attempt === 0 ? 0 : random.next();
    const mode = roll < 0.25 ? 'prefix' : roll < 0.4 ? 'durable only' : roll < 0.7 ? 'random' : 'torn';
    const chosen = [];
    for (const op of optional) {
      if (mode === 'prefix' && op.ok && op.end < cut) chosen.push({ op });
      if (mode === 'random' && random.chance(0.5)) chosen.push({ op });
      if (mode === 'torn') {
        const pages = op.kind === 'write' ? pagesOf(op) : [[op.offset, op.offset + op.length]];
        if (pages.length > 1 && random.chance(0.6)) {
          const some = pages.filter(() => random.chance(0.5));
          if (some.length > 0) chosen.push({ op, pieces: some });
        } else if (random.chance(0.5)) chosen.push({ op });
      }
    }
    let lastAck = 0;
    for (const ack of run.acks) if (ack.index < cut) lastAck = ack.batch;
    const key = `${barrier}|${lastAck}|${chosen.map((c) => (c.pieces ? `${c.op.id}:${c.pieces.map((p) => p[0]).join('/')}` : c.op.id)).join(',')}`;
    if (!states.has(key)) states.set(key, { cut, barrier, lastAck, mode, optional, chosen });
  }
  return [...states.values()].sort((a, b) => a.cut - b.cut || a.barrier - b.barrier);
}

/** A write's host range split at 4 KiB page boundaries. */
function pagesOf(op) {
  const pieces = [];
  for (let start = op.offset; start < op.offset + op.length; ) {
    const end = Math.min(op.offset + op.length, (Math.floor(start / PAGE) + 1) * PAGE);
    pieces.push([start, end]);
    start = end;
  }
  return pieces;
}

/** Pairs of modifying requests in flight at once over the same bytes: their order on disk is not defined. */
function overlappingWrites(modifying) {
  let pairs = 0;
  for (let i = 0; i < modifying.length; i++) {
    const a = modifying[i];
    for (let j = i + 1; j < modifying.length && modifying[j].issue < a.end; j++) {
      const b = modifying[j];
      if (a.kind === 'truncate' || b.kind === 'truncate' || (a.offset < b.offset + b.length && b.offset < a.offset + a.length)) pairs += 1;
    }
  }
  return pairs;
}

async function withFile(path, work) {
  const handle = await open(path, 'r+');
  try {
    await work(handle);
  } finally {
    await handle.close();
  }
}

/** Applies requests (whole, or only `pieces` of a write) in issue order. */
async function applyOps(handle, chosen) {
  for (const { op, pieces } of [...chosen].sort((a, b) => a.op.issue - b.op.issue)) {
    if (op.kind === 'write') {
      for (const [start, end] of pieces ?? [[op.offset, op.offset + op.length]]) await handle.write(op.data, start - op.offset, end - start, start);
    } else if (op.kind === 'truncate') {
      await handle.truncate(op.offset);
    } else if (op.kind === 'punch') {
      const size = (await handle.stat()).size;
      const end = Math.min(op.offset + op.length, size);
      if (end > op.offset) await handle.write(Buffer.alloc(end - op.offset), 0, end - op.offset, op.offset);
    }
  }
}

/** The guest's disk after each acknowledged batch, made on demand from the one before. */
class ExpectedDisk {
  constructor(initial, batches) {
    this.batches = batches;
    this.disks = new Map([[0, initial]]);
  }

  at(acked) {
    let known = acked;
    while (!this.disks.has(known)) known -= 1;
    for (let batch = known + 1; batch <= acked; batch++) {
      const disk = Buffer.from(this.disks.get(batch - 1));
      for (const op of this.batches[batch - 1].ops) opData(op).copy(disk, op.offset);
      this.disks.set(batch, disk);
      this.disks.delete(batch - 3);
    }
    return { disk: this.disks.get(acked), inFlight: this.batches[acked]?.ops ?? [], acked };
  }
}

/** Runs every check on one state; returns undefined or what failed. */
async function checkState(path, workload, state, expected, stats) {
  const { format } = workload;
  const header = await headerState(path, format);
  if (header.corrupt) return 'the header is marked corrupt';
  // Leaks a crash may leave: qcow2 without the dirty bit (refcounts are raised before the L2
  // entries are written); QED marked need-check (its repair cuts leaked clusters off the end of
  // the file, but QED cannot reuse ones in the middle, docs/formats/qed.md). An image imgmount
  // repaired from its dirty bit (qcow2, lazy refcounts) has rebuilt refcounts: no leaks.
  const leaksAllowed = format === 'qcow2' ? !header.dirty : header.dirty;
  if (!header.dirty) {
    const before = await qemuCheck(path, format);
    if (before.code === 3) stats.leaksBefore += 1;
    if (!(before.code === 0 || (before.code === 3 && leaksAllowed))) return `not marked ${format === 'qed' ? 'need-check' : 'dirty'}, yet qemu-img check (before any repair) exited ${before.code}:\n${before.output}`;
  } else stats.repaired += 1;
  const notices = [];
  let image;
  try {
    image = await openImage(path, { format, idleCleanSeconds: 0, notice: (line) => notices.push(line) });
  } catch (error) {
    return `imgmount cannot open it read-write: ${error.message}`;
  }
  let problem;
  try {
    const disk = Buffer.alloc(workload.virtualSize);
    await image.read(0, disk);
    problem = compareDisk(disk, expected, workload);
  } catch (error) {
    problem = `reading the disk failed: ${error.message}`;
  } finally {
    try {
      await image.close();
    } catch (error) {
      problem ??= `closing it failed: ${error.message}`;
    }
  }
  if (problem) return notices.length > 0 ? `${problem}\n  (open said: ${notices.join(' | ')})` : problem;
  const after = await qemuCheck(path, format);
  if (after.code === 3) stats.leaksAfter += 1;
  if (!(after.code === 0 || (after.code === 3 && leaksAllowed))) {
    return `after imgmount's read-write open and close, qemu-img check exited ${after.code}:\n${after.output}${notices.length > 0 ? `\n  (open said: ${notices.join(' | ')})` : ''}`;
  }
  return undefined;
}

/** Acknowledged bytes must read as written; batch N+1's ranges as before or as written, per 512-byte piece. */
function compareDisk(disk, expected, workload) {
  if (disk.equals(expected.disk)) return undefined;
  const seen = Buffer.from(disk);
  for (const op of expected.inFlight) {
    const data = opData(op);
    for (let start = op.offset; start < op.offset + op.length; ) {
      const end = Math.min(op.offset + op.length, (Math.floor(start / 512) + 1) * 512);
      const got = disk.subarray(start, end);
      if (got.equals(data.subarray(start - op.offset, end - op.offset))) expected.disk.copy(seen, start, start, end);
      else if (!got.equals(expected.disk.subarray(start, end))) {
        return `guest bytes ${start}-${end - 1} (in batch ${expected.acked + 1}'s ${op.kind} of ${op.length} bytes at ${op.offset}, not yet acknowledged) read as neither the old bytes nor the new ones`;
      }
      start = end;
    }
  }
  if (seen.equals(expected.disk)) return undefined;
  let first = 0;
  while (seen[first] === expected.disk[first]) first += 1;
  let last = first;
  while (last + 1 < seen.length && seen[last + 1] !== expected.disk[last + 1]) last += 1;
  let writer = 'the disk before the run';
  for (let batch = expected.acked; batch >= 1 && writer === 'the disk before the run'; batch--) {
    const op = workload.batches[batch - 1].ops.find((o) => first >= o.offset && first < o.offset + o.length);
    if (op) writer = `batch ${batch}'s ${op.kind} of ${op.length} bytes at ${op.offset}`;
  }
  return `guest bytes from ${first} (through ${last} at least) differ from what was acknowledged (last written by ${writer}; ${expected.acked} batches acknowledged)`;
}

/**
 * `qemu-img check` of a state. A qemu-img that could not be started (EAGAIN on a loaded machine)
 * is tried again, up to 3 times: that says nothing about the state. One killed by a signal is
 * reported as such (a qemu-img crash on an image is worth seeing).
 */
async function qemuCheck(path, format) {
  for (let attempt = 1; ; attempt++) {
    const result = await new Promise((resolve) => {
      execFile('qemu-img', ['check', '-f', format, path], { encoding: 'utf8' }, (error, stdout, stderr) => {
        const output = `${stdout}${stderr}`.trim().split('\n').slice(0, 12).join('\n');
        if (!error) resolve({ code: 0, output });
        else if (typeof error.code === 'number') resolve({ code: error.code, output });
        else if (error.signal) resolve({ code: 1, output: `(qemu-img was killed by ${error.signal})\n${output}` });
        else resolve({ code: 1, output: `(qemu-img could not run: ${error.message})`, notStarted: true });
      });
    });
    if (!result.notStarted || attempt === 3) return result;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/** The report of a failed state: where the cut is, what was applied, what failed. */
function describe(run, workload, state, number, total, problem) {
  const { log } = run;
  const at = log.records[state.cut];
  const where = at ? `before record ${state.cut} of ${log.records.length} (${at.kind} ${at.phase}, request ${at.id}${at.kind === 'write' || at.kind === 'punch' ? `, ${at.length} bytes at host offset ${at.offset}` : ''})` : `at the end of the log (${log.records.length} records)`;
  let batch = 0;
  for (const start of run.batchStarts) if (start.index < state.cut) batch = start.batch;
  const barrierOp = state.barrier >= 0 ? log.records[state.barrier] : undefined;
  const name = (c) => `${c.op.kind} ${c.op.id} (${c.op.length} B at ${c.op.offset}${c.pieces ? `, pages at ${c.pieces.map((p) => p[0]).join(',')} only` : ''})`;
  const chosenIds = new Set(state.chosen.map((c) => c.op.id));
  const left = state.optional.filter((op) => !chosenIds.has(op.id));
  const lines = [
    `FAILED: ${workload.variant.name}, state ${number + 1} of ${total} (seed ${workload.seed}): cut ${where}, during batch ${batch}, ${state.lastAck} batches acknowledged`,
    `  durable: every request that ended before ${barrierOp ? `flush ${barrierOp.id} was issued (record ${state.barrier})` : 'the first flush (none ended before the cut)'}`,
    `  optional requests, chosen "${state.mode}": applied ${state.chosen.length > 0 ? state.chosen.map(name).join(', ') : 'none'}; left out ${left.length > 0 ? left.map((op) => `${op.kind} ${op.id}`).join(', ') : 'none'}`,
    `  ${problem.split('\n').join('\n  ')}`,
  ];
  return lines.join('\n');
}
