/**
 * Crash safety of VHDX writes: a write + flush workload (allocating writes,
 * in-place writes, a zero write, the header update of the first write, BAT
 * changes through the log) runs over a recording protocol that keeps every
 * write, truncate and flush in order. A crash keeps everything before the
 * last completed flush and any subset of what came after it (writes between
 * two flushes may reach the disk in any order), and a metadata write may be
 * torn (only its first half on disk). Every such state must:
 *   - open here (read-only: a pending log is replayed in memory) and read, for
 *     every guest write, its old bytes or its new ones (never a mix, never
 *     other bytes: a write over two new blocks allocates both in one log
 *     entry), the new ones for every write a completed flush covered,
 *     and the old bytes everywhere else;
 *   - read the same in qemu: `qemu-img check` clean and `qemu-img convert`
 *     equal, or, when qemu says the log must be replayed first, the same after
 *     `qemu-img check -r all` on a copy.
 * And I/O errors (blkdebug) at every step of an allocation: the write fails
 * with the error, the image reads old or new bytes there and the old ones
 * elsewhere, here and in qemu, and the next session writes it cleanly.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BlockImage, openImage } from '../src/index.js';
import { FileProtocol } from '../src/block/file.js';
import { ImageFileGate } from '../src/block/gate.js';
import type { Protocol } from '../src/block/types.js';
import { vhdx } from '../src/formats/vhdx/index.js';
import { makeTempDir, qemuConvertToRaw, qemuImg, qemuIo, readAll, run, seededBytes, skipWithoutQemu } from './helpers/qemu.js';
import { STATE, writeVhdx, type BlockSpec } from './helpers/vhdx-writer.js';
import { subsets } from './helpers/recording-protocol.js';

const MiB = 1024 * 1024;
const T = { timeout: 600_000 };

type Recorded = { kind: 'write'; offset: number; data: Buffer } | { kind: 'truncate'; length: number };
type Entry = Recorded | { kind: 'flush' } | { kind: 'acked'; write: number };

/** A file protocol that records every write (with its bytes), truncate and flush, in order. */
async function recordingProtocol(path: string, log: Entry[]): Promise<Protocol> {
  const inner = await FileProtocol.open(path, false);
  return {
    path,
    readOnly: false,
    read: (offset, buffer) => inner.read(offset, buffer),
    async write(offset, buffer) {
      log.push({ kind: 'write', offset, data: Buffer.from(buffer) });
      await inner.write(offset, buffer);
    },
    async flush() {
      await inner.flush();
      log.push({ kind: 'flush' });
    },
    size: () => inner.size(),
    allocatedSize: () => inner.allocatedSize(),
    async truncate(length) {
      log.push({ kind: 'truncate', length });
      await inner.truncate(length);
    },
    close: () => inner.close(),
  };
}

function apply(base: Buffer, records: readonly Recorded[]): Buffer {
  const capacity = records.reduce((max, r) => Math.max(max, r.kind === 'truncate' ? r.length : r.offset + r.data.length), base.length);
  const file = Buffer.alloc(capacity);
  base.copy(file);
  let length = base.length;
  for (const r of records) {
    if (r.kind === 'truncate') {
      if (r.length < length) file.fill(0, r.length, length);
      length = r.length;
    } else {
      r.data.copy(file, r.offset);
      length = Math.max(length, r.offset + r.data.length);
    }
  }
  return file.subarray(0, length);
}

interface GuestWrite {
  offset: number;
  data: Buffer;
  /** A zero write (data is zeros). */
  zero?: boolean;
  /** Flush after this write (every write so far is then acknowledged). */
  flush?: boolean;
  /**
   * Old or new per 512-byte sector only (as a disk's own multi-sector write): a write into a partially
   * present block goes in place into the sectors present there, and into the others when the block
   * becomes FULLY_PRESENT.
   */
  sectorwise?: boolean;
}

interface CrashState {
  name: string;
  /** The file's bytes in this state, made when asked (held all at once, the states took gigabytes). */
  file: () => Buffer;
  acked: Set<number>;
}

/** Runs `writes` on `working` through a recording protocol (over `backing` for a differencing image); returns the log. */
async function recordWorkload(working: string, writes: readonly GuestWrite[], backing?: BlockImage): Promise<Entry[]> {
  const log: Entry[] = [];
  const protocol = await recordingProtocol(working, log);
  const files = new ImageFileGate(working, {}, true);
  const image = new BlockImage({ path: working, format: 'vhdx', file: protocol, image: await vhdx.open(protocol, { readOnly: false, files }), gate: files, backing });
  expect(image.readOnly).toBe(false);
  for (const [i, w] of writes.entries()) {
    if (w.zero) await image.zero(w.offset, w.data.length);
    else await image.write(w.offset, w.data);
    if (w.flush) {
      await image.flush();
      for (let j = 0; j <= i; j++) log.push({ kind: 'acked', write: j });
    }
  }
  await image.close();
  return log;
}

/**
 * Every crash state of the log: all epochs (between completed flushes) before one, and any subset
 * of that one (its prefixes when it has more than `maxSubsetRecords` records); and each metadata write below
 * `metadataEnd` (headers, log, BAT) torn in half. (A torn guest data write mixes old and new
 * sectors in every format; the structures must survive tears.)
 */
function crashStates(base: Buffer, log: readonly Entry[], metadataEnd: number, maxSubsetRecords = 6): { states: CrashState[]; final: Buffer } {
  const epochs: Array<{ records: Recorded[]; acked: Set<number> }> = [{ records: [], acked: new Set() }];
  for (const entry of log) {
    const current = epochs[epochs.length - 1]!;
    if (entry.kind === 'flush') epochs.push({ records: [], acked: new Set(current.acked) });
    else if (entry.kind === 'acked') current.acked.add(entry.write);
    else current.records.push(entry);
  }
  const states: CrashState[] = [];
  for (const [e, epoch] of epochs.entries()) {
    const earlier = epochs.slice(0, e).flatMap((x) => x.records);
    const choices = epoch.records.length <= maxSubsetRecords ? subsets(epoch.records) : epoch.records.map((_, n) => epoch.records.slice(0, n + 1));
    for (const [c, kept] of choices.entries()) states.push({ name: `epoch ${e} subset ${c}`, file: () => apply(base, [...earlier, ...kept]), acked: epoch.acked });
    for (const [n, r] of epoch.records.entries()) {
      if (r.kind !== 'write' || r.data.length < 1024 || r.offset >= metadataEnd) continue;
      const half: Recorded = { kind: 'write', offset: r.offset, data: r.data.subarray(0, Math.floor(r.data.length / 1024) * 512) };
      states.push({ name: `epoch ${e} record ${n} torn`, file: () => apply(base, [...earlier, ...epoch.records.slice(0, n), half]), acked: epoch.acked });
    }
  }
  return { states, final: apply(base, epochs.flatMap((x) => x.records)) };
}

/** Every write reads wholly old or wholly new (a write over two new blocks allocates both in one log entry), flushed ones new, nothing else changed. */
function expectOldOrNew(ours: Buffer, oldBytes: Buffer, writes: readonly GuestWrite[], acked: Set<number>, why: string): void {
  const covered = Buffer.alloc(ours.length);
  for (const [i, w] of writes.entries()) {
    covered.fill(1, w.offset, w.offset + w.data.length);
    const end = w.offset + w.data.length;
    const next = (at: number) => (w.sectorwise ? Math.min(end, (Math.floor(at / 512) + 1) * 512) : end);
    for (let from = w.offset; from < end; from = next(from)) {
      const to = next(from);
      const piece = ours.subarray(from, to);
      const isNew = piece.equals(w.data.subarray(from - w.offset, to - w.offset));
      expect(isNew || piece.equals(oldBytes.subarray(from, to)), `${why}: write ${i} (${from}..${to}) reads its old or its new bytes`).toBe(true);
      if (acked.has(i)) expect(isNew, `${why}: write ${i} (${from}..${to}), flushed, reads its new bytes`).toBe(true);
    }
  }
  for (let b = 0; b < ours.length; b++) {
    if (!covered[b] && ours[b] !== oldBytes[b]) throw new Error(`${why}: byte ${b} outside every write changed`);
  }
}

describe.skipIf(skipWithoutQemu('vhdx crash'))('VHDX writes at every crash point', () => {
  it('every crash state opens here and in qemu, with old or new bytes per write and every flushed write', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxcrash-');
    const before = join(dir, 'before.vhdx');
    await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', before, String(8 * MiB)]);
    await qemuIo(before, ['write -P 0x21 0 700000'], 'vhdx'); // block 0 allocated by qemu
    const working = join(dir, 'working.vhdx');
    await copyFile(before, working);
    const oldBytes = await qemuConvertToRaw(before, dir, 'vhdx');
    const writes: GuestWrite[] = [
      { offset: 2 * MiB + 5000, data: seededBytes(1, 100_000), flush: true }, // allocates block 2
      { offset: 1000, data: seededBytes(2, 4096) }, // in place, block 0
      { offset: 5 * MiB - 3000, data: seededBytes(3, 6000), flush: true }, // allocates blocks 4 and 5
      { offset: 300_000, data: Buffer.alloc(10_000), zero: true }, // a zero write in place, block 0
      { offset: 8 * MiB - 512, data: seededBytes(5, 512) }, // allocates block 7, never flushed by hand
    ];
    const log = await recordWorkload(working, writes);
    const newBytes = Buffer.from(oldBytes);
    for (const w of writes) w.data.copy(newBytes, w.offset);
    // Metadata lies below the first block (8 MiB in qemu's layout).
    const { states, final } = crashStates(await readFile(before), log, 8 * MiB);
    expect(final.equals(await readFile(working)), 'the recording replays to the written file').toBe(true);

    let pendingLogs = 0;
    for (const [s, state] of states.entries()) {
      const path = join(dir, `state.vhdx`);
      const { ours, pending } = await readState(path, state.file());
      const why = `${state.name} (state ${s})`;
      expectOldOrNew(ours, oldBytes, writes, state.acked, why);
      const check = await run('qemu-img', ['check', '-f', 'vhdx', path]);
      let qemuSees = path;
      if (pending) {
        pendingLogs += 1;
        expect(check.stderr, `${why}: qemu wants the log replayed`).toMatch(/log that needs to be replayed/);
        qemuSees = join(dir, 'replayed.vhdx');
        await copyFile(path, qemuSees);
        const repaired = await run('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', qemuSees]);
        expect(repaired.code, `${why}: qemu-img check -r all: ${repaired.stdout}${repaired.stderr}`).toBe(0);
      } else {
        expect(check.code, `${why}: qemu-img check: ${check.stdout}${check.stderr}`).toBe(0);
      }
      expect((await qemuConvertToRaw(qemuSees, dir, 'vhdx')).equals(ours), `${why}: qemu reads what we read`).toBe(true);
    }
    expect(states.length).toBeGreaterThan(40);
    expect(pendingLogs, 'crash states with a log to replay').toBeGreaterThan(0);
    expect((await qemuConvertToRaw(working, dir, 'vhdx')).equals(newBytes)).toBe(true);
  });

  it('a differencing image (old bytes: the parent\'s): every crash state reads old or new per write and every flushed write; libvhdi agrees where no log is pending', T, async () => {
    const dir = await makeTempDir('imgmount-vhdxcrash-');
    const parent = join(dir, 'base.vhdx');
    const parentBlocks = new Map<number, BlockSpec>();
    for (let b = 0; b < 5; b++) parentBlocks.set(b, { state: STATE.FULLY_PRESENT, data: seededBytes(60 + b, MiB) });
    const { dataWriteGuid } = await writeVhdx(parent, { virtualSize: 5 * MiB, blockSize: MiB, blocks: parentBlocks });
    const before = join(dir, 'before.avhdx');
    await writeVhdx(before, {
      virtualSize: 5 * MiB, blockSize: MiB, parent: { linkage: dataWriteGuid, relativePath: 'base.vhdx' },
      blocks: new Map<number, BlockSpec>([
        [1, { state: STATE.PARTIALLY_PRESENT, data: seededBytes(71, MiB), present: (sector) => sector % 4 === 1 }],
        [2, { state: STATE.FULLY_PRESENT, data: seededBytes(72, MiB) }],
      ]),
    });
    const working = join(dir, 'working.avhdx');
    await copyFile(before, working);
    const oldBytes = await libvhdiRead([before, parent], join(dir, 'old.raw'));
    const writes: GuestWrite[] = [
      { offset: 5000, data: seededBytes(81, 20_000), flush: true }, // NOT_PRESENT block 0: a new block, the rest from the parent
      { offset: MiB + 1000, data: seededBytes(82, 3000), sectorwise: true }, // partially present block 1: completed from the parent
      { offset: 2 * MiB + 100, data: seededBytes(83, 512), flush: true }, // in place, block 2
      { offset: 4 * MiB - 1000, data: seededBytes(84, 2000) }, // blocks 3 and 4 from the parent, never flushed by hand
    ];
    const backing = await openImage(parent, { readOnly: true, format: 'vhdx' });
    const log = await recordWorkload(working, writes, backing);
    const newBytes = Buffer.from(oldBytes);
    for (const w of writes) w.data.copy(newBytes, w.offset);
    // Metadata (headers, log, BAT, metadata region) lies before the end of the last region the region table names.
    const head = await readFile(before);
    const regionsEnd = Math.max(...[0, 1].map((i) => Number(head.readBigUInt64LE(192 * 1024 + 32 + 32 * i)) + head.readUInt32LE(192 * 1024 + 40 + 32 * i)));
    // (epochs here hold many writes (parent copies): every subset only of epochs of 2 records, else prefixes, to stay fast)
    const { states, final } = crashStates(head, log, regionsEnd, 2);
    expect(final.equals(await readFile(working)), 'the recording replays to the written file').toBe(true);
    let pendingLogs = 0;
    for (const [s, state] of states.entries()) {
      const path = join(dir, 'state.avhdx');
      const { ours, pending } = await readState(path, state.file());
      const why = `${state.name} (state ${s})`;
      expectOldOrNew(ours, oldBytes, writes, state.acked, why);
      // libvhdi does not replay a log: compare it where none is pending (every third such state: it is slow to start)
      if (pending) pendingLogs += 1;
      else if (s % 3 === 0) expect((await libvhdiRead([path, parent], join(dir, 'state.raw'))).equals(ours), `${why}: libvhdi reads what we read`).toBe(true);
    }
    expect(states.length).toBeGreaterThan(30);
    expect(pendingLogs).toBeGreaterThan(0);
    expect((await libvhdiRead([working, parent], join(dir, 'new.raw'))).equals(newBytes)).toBe(true);
  });
});

/** The guest bytes of `files` (child first, then its parents) as libvhdi (python3-libvhdi) reads them. */
async function libvhdiRead(files: string[], out: string): Promise<Buffer> {
  const script = [
    'import pyvhdi, sys, json',
    'files = []',
    'for n in json.loads(sys.argv[1]):',
    '    f = pyvhdi.file(); f.open(n); files.append(f)',
    'for c, p in zip(files, files[1:]):',
    '    c.set_parent(p)',
    'top = files[0]',
    'with open(sys.argv[2], "wb") as out:',
    '    out.write(top.read_buffer_at_offset(top.get_media_size(), 0))',
  ].join('\n');
  const result = await run('/usr/bin/python3', ['-c', script, JSON.stringify(files), out]);
  if (result.code !== 0) throw new Error(`libvhdi (python3-libvhdi) failed: ${result.stderr}`);
  return readFile(out);
}

describe.skipIf(skipWithoutQemu('vhdx I/O errors'))('VHDX writes failing at every step (blkdebug)', () => {
  const steps = ['cluster_alloc', 'write_aio', 'header_update', 'l1_update', 'flush_to_disk'] as const;
  for (const event of steps) {
    it(`EIO after ${event} (1st, 2nd and 3rd time): the write fails, the image stays consistent and takes the write again`, T, async () => {
      const dir = await makeTempDir('imgmount-vhdxerr-');
      const before = join(dir, 'before.vhdx');
      await qemuImg(['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', before, String(6 * MiB)]);
      await qemuIo(before, ['write -P 0x21 0 5000'], 'vhdx');
      const oldBytes = await qemuConvertToRaw(before, dir, 'vhdx');
      const data = seededBytes(7, 300_000);
      const at = 3 * MiB + 1234;
      let failures = 0;
      for (const nth of [1, 2, 3]) {
        const path = join(dir, `failed-${nth}.vhdx`);
        await copyFile(before, path);
        const image = await openImage(path, { format: 'vhdx', idleCleanSeconds: 0, filters: [{ name: 'blkdebug', event, errno: 'EIO', nth: String(nth) }] });
        const outcome = await image.write(at, data).then(() => image.flush()).then(() => undefined, (error: Error) => error);
        if (outcome) {
          failures += 1;
          expect(outcome.message).toMatch(/EIO|I\/O error|Input\/output/);
        }
        await image.close().catch(() => undefined);
        const notices: string[] = [];
        const opened = await openImage(path, { readOnly: true, format: 'vhdx', notice: (line) => notices.push(line) });
        const ours = await readAll(opened);
        await opened.close();
        const piece = ours.subarray(at, at + data.length);
        expect(piece.equals(data) || piece.equals(oldBytes.subarray(at, at + data.length)), `nth ${nth}: old or new bytes`).toBe(true);
        if (!outcome) expect(piece.equals(data), `nth ${nth}: a write that succeeded reads back`).toBe(true);
        const rest = Buffer.from(ours);
        oldBytes.copy(rest, at, at, at + data.length);
        expect(rest.equals(oldBytes), `nth ${nth}: nothing else changed`).toBe(true);
        let qemuSees = path;
        if (notices.some((line) => /log holds/.test(line))) {
          qemuSees = join(dir, `replayed-${nth}.vhdx`);
          await copyFile(path, qemuSees);
          expect((await run('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', qemuSees])).code).toBe(0);
        } else {
          const check = await run('qemu-img', ['check', '-f', 'vhdx', path]);
          expect(check.code, `nth ${nth}: ${check.stdout}${check.stderr}`).toBe(0);
        }
        expect((await qemuConvertToRaw(qemuSees, dir, 'vhdx')).equals(ours), `nth ${nth}: qemu reads what we read`).toBe(true);
        // The next session (a read-write open: a pending log is replayed on disk) writes it.
        const again = await openImage(path, { format: 'vhdx' });
        await again.write(at, data);
        await again.close();
        const model = Buffer.from(oldBytes);
        data.copy(model, at);
        expect((await run('qemu-img', ['check', '-f', 'vhdx', path])).code).toBe(0);
        expect((await qemuConvertToRaw(path, dir, 'vhdx')).equals(model), `nth ${nth}: rewritten`).toBe(true);
      }
      expect(failures, `${event}: the injected errors reached the write`).toBeGreaterThan(0);
    });
  }
});

/** Writes a crash state to `path` and reads it read-only as we would: its guest bytes, and whether a log was left to replay. */
async function readState(path: string, file: Buffer): Promise<{ ours: Buffer; pending: boolean }> {
  await writeFile(path, file);
  const notices: string[] = [];
  const opened = await openImage(path, { readOnly: true, format: 'vhdx', notice: (line) => notices.push(line) });
  const ours = await readAll(opened);
  await opened.close();
  return { ours, pending: notices.some((line) => /log holds/.test(line)) };
}
