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

function subsets<T>(items: readonly T[]): T[][] {
  return Array.from({ length: 2 ** items.length }, (_, mask) => items.filter((_, i) => mask & (1 << i)));
}

function apply(base: Buffer, records: readonly Recorded[]): Buffer {
  let file = Buffer.from(base);
  for (const r of records) {
    if (r.kind === 'truncate') {
      file = r.length <= file.length ? file.subarray(0, r.length) : Buffer.concat([file, Buffer.alloc(r.length - file.length)]);
    } else {
      if (r.offset + r.data.length > file.length) file = Buffer.concat([file, Buffer.alloc(r.offset + r.data.length - file.length)]);
      r.data.copy(file, r.offset);
    }
  }
  return file;
}

interface GuestWrite {
  offset: number;
  data: Buffer;
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

    const log: Entry[] = [];
    const protocol = await recordingProtocol(working, log);
    const files = new ImageFileGate(working, {}, true);
    const image = new BlockImage({ path: working, format: 'vhdx', file: protocol, image: await vhdx.open(protocol, { readOnly: false, files }), gate: files });
    const writes: GuestWrite[] = [
      { offset: 2 * MiB + 5000, data: seededBytes(1, 100_000) }, // allocates block 2
      { offset: 1000, data: seededBytes(2, 4096) }, // in place, block 0
      { offset: 5 * MiB - 3000, data: seededBytes(3, 6000) }, // allocates blocks 4 and 5
      { offset: 300_000, data: Buffer.alloc(10_000) }, // a zero write in place, block 0
      { offset: 8 * MiB - 512, data: seededBytes(5, 512) }, // allocates block 7, never flushed by hand
    ];
    const flushAfter = new Set([0, 2]);
    for (const [i, w] of writes.entries()) {
      if (i === 3) await image.zero(w.offset, w.data.length);
      else await image.write(w.offset, w.data);
      if (flushAfter.has(i)) {
        await image.flush();
        for (let j = 0; j <= i; j++) log.push({ kind: 'acked', write: j });
      }
    }
    await image.close();
    const newBytes = Buffer.from(oldBytes);
    for (const w of writes) w.data.copy(newBytes, w.offset);
    const written = await readFile(working);

    // Epochs between completed flushes; acks recorded after a flush belong to the epoch it opens.
    const epochs: Array<{ records: Recorded[]; acked: Set<number> }> = [{ records: [], acked: new Set() }];
    for (const entry of log) {
      const current = epochs[epochs.length - 1]!;
      if (entry.kind === 'flush') epochs.push({ records: [], acked: new Set(current.acked) });
      else if (entry.kind === 'acked') current.acked.add(entry.write);
      else current.records.push(entry);
    }
    const base = await readFile(before);
    const states: Array<{ name: string; file: Buffer; acked: Set<number> }> = [];
    for (const [e, epoch] of epochs.entries()) {
      const earlier = epochs.slice(0, e).flatMap((x) => x.records);
      const choices = epoch.records.length <= 6 ? subsets(epoch.records) : epoch.records.map((_, n) => epoch.records.slice(0, n + 1));
      for (const [c, kept] of choices.entries()) states.push({ name: `epoch ${e} subset ${c}`, file: apply(base, [...earlier, ...kept]), acked: epoch.acked });
      // Torn: one metadata write of the epoch (header, log entry, BAT sector: all below the first block, at 8 MiB
      // in qemu's layout) only half on disk, whole 512-byte sectors. (A torn guest data write mixes old and new
      // sectors in every format; the structures must survive tears.)
      for (const [n, r] of epoch.records.entries()) {
        if (r.kind !== 'write' || r.data.length < 1024 || r.offset >= 8 * MiB) continue;
        const half: Recorded = { kind: 'write', offset: r.offset, data: r.data.subarray(0, Math.floor(r.data.length / 1024) * 512) };
        states.push({ name: `epoch ${e} record ${n} torn`, file: apply(base, [...earlier, ...epoch.records.slice(0, n), half]), acked: epoch.acked });
      }
    }
    expect(apply(base, epochs.flatMap((x) => x.records)).equals(written), 'the recording replays to the written file').toBe(true);

    let pendingLogs = 0;
    for (const [s, state] of states.entries()) {
      const path = join(dir, `state.vhdx`);
      await writeFile(path, state.file);
      const notices: string[] = [];
      const opened = await openImage(path, { readOnly: true, format: 'vhdx', notice: (line) => notices.push(line) });
      const ours = await readAll(opened);
      await opened.close();
      const why = `${state.name} (state ${s})`;
      const covered = Buffer.alloc(ours.length);
      for (const [i, w] of writes.entries()) {
        covered.fill(1, w.offset, w.offset + w.data.length);
        // A write over two new blocks allocates both in one log entry: it too reads wholly old or wholly new.
        const piece = ours.subarray(w.offset, w.offset + w.data.length);
        const isNew = piece.equals(w.data);
        expect(isNew || piece.equals(oldBytes.subarray(w.offset, w.offset + w.data.length)), `${why}: write ${i} reads its old or its new bytes`).toBe(true);
        if (state.acked.has(i)) expect(isNew, `${why}: write ${i}, flushed, reads its new bytes`).toBe(true);
      }
      for (let at = 0; at < ours.length; at += 4096) {
        for (let b = at; b < Math.min(ours.length, at + 4096); b++) {
          if (!covered[b] && ours[b] !== oldBytes[b]) throw new Error(`${why}: byte ${b} outside every write changed`);
        }
      }
      const pending = notices.some((line) => /log holds/.test(line));
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
});

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
