/**
 * Idle clean without FUSE: the timer itself (fake timers: it fires only after
 * the whole delay with no write running, a write during a clean waits for it,
 * close stops it), the option's validation, and real QED and qcow2 images
 * opened with a short idle time. A copy of the image file taken while it is
 * still open is what a kill -9 would leave (the page cache survives the
 * process): after the idle time qemu-img check finds it clean with nothing to
 * repair, the need-check / dirty bit is clear, and a read-write open of the
 * copy repairs nothing. The next allocating write sets the bit (header write
 * and flush) before any data or metadata is written.
 */
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createImage, InvalidArgumentError, openImage, type BlockImage } from '../src/index.js';
import { BlockImage as BlockImageClass } from '../src/block/image.js';
import { ImageFileGate } from '../src/block/gate.js';
import { IdleClean, idleCleanDelayMs, parseIdleCleanSeconds } from '../src/block/idle-clean.js';
import { qcow2 } from '../src/formats/qcow2/index.js';
import { qed } from '../src/formats/qed/index.js';
import type { FormatDriver, FormatImage } from '../src/block/types.js';
import { makeTempDir, qemuImg, readU64, run, seededBytes, skipWithoutQemu, spyProtocol } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** QED need-check: header features (u64 LE at 16), bit 0x02. */
const qedNeedCheck = async (path: string): Promise<boolean> => ((await readU64(path, 16)) & 0x02n) !== 0n;
/** qcow2 dirty: incompatible_features (u64 BE at 72), bit 0. */
const qcow2Dirty = async (path: string): Promise<boolean> => ((await readFile(path)).readBigUInt64BE(72) & 1n) !== 0n;

/** Polls (real time) until `condition` holds; fails after `ms`. */
async function waitUntil(what: string, condition: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Lets pending I/O callbacks run without touching (possibly fake) timers. */
async function settleIo(rounds = 200): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise((resolve) => setImmediate(resolve));
}

describe('the idle timer (fake timers)', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('fires once, the whole delay after the last write ended; every write starts it again; none while a write runs', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
    const cleans: number[] = [];
    const idle = new IdleClean(5000, async () => void cleans.push(Date.now()), () => undefined);
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(4900);
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(4900);
    expect(cleans).toHaveLength(0);
    // A write that runs longer than the delay: nothing fires while it runs.
    let finish!: () => void;
    const long = idle.around(() => new Promise<void>((resolve) => (finish = resolve)));
    await vi.advanceTimersByTimeAsync(20_000);
    expect(cleans).toHaveLength(0);
    finish();
    await long;
    await vi.advanceTimersByTimeAsync(4999);
    expect(cleans).toHaveLength(0);
    await vi.advanceTimersByTimeAsync(1);
    expect(cleans).toHaveLength(1);
    // Idle from then on: no second clean without a write.
    await vi.advanceTimersByTimeAsync(60_000);
    expect(cleans).toHaveLength(1);
    await idle.stop();
  });

  it('a write that arrives during a clean starts only once the clean has ended; stop ends the timer for good', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
    const events: string[] = [];
    let endClean!: () => void;
    const idle = new IdleClean(
      1000,
      () => {
        events.push('clean begins');
        return new Promise<void>((resolve) => {
          endClean = () => {
            events.push('clean ends');
            resolve();
          };
        });
      },
      () => undefined,
    );
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(1000);
    expect(events).toEqual(['clean begins']);
    const write = idle.around(async () => void events.push('write'));
    await settleIo(5);
    expect(events).toEqual(['clean begins']);
    endClean();
    await write;
    expect(events).toEqual(['clean begins', 'clean ends', 'write']);
    // The write armed the timer again; stop ends it, and later writes arm nothing.
    await idle.stop();
    await vi.advanceTimersByTimeAsync(10_000);
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(10_000);
    expect(events).toEqual(['clean begins', 'clean ends', 'write']);
  });

  it('stop waits for a clean that runs', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
    let endClean!: () => void;
    const idle = new IdleClean(10, () => new Promise<void>((resolve) => (endClean = resolve)), () => undefined);
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(10);
    let stopped = false;
    const stopping = idle.stop().then(() => (stopped = true));
    await settleIo(5);
    expect(stopped).toBe(false);
    endClean();
    await stopping;
    expect(stopped).toBe(true);
  });

  it('a failed clean is reported; the next write and idle time try again', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
    const failures: unknown[] = [];
    let attempts = 0;
    const idle = new IdleClean(
      100,
      async () => {
        attempts++;
        if (attempts === 1) throw new Error('EIO');
      },
      (error) => failures.push(error),
    );
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(100);
    expect(failures).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1000);
    expect(attempts).toBe(1);
    await idle.around(async () => undefined);
    await vi.advanceTimersByTimeAsync(100);
    expect(attempts).toBe(2);
    expect(failures).toHaveLength(1);
    await idle.stop();
  });

  it('its timer does not keep the process alive (unref)', async () => {
    const idle = new IdleClean(60_000, async () => undefined, () => undefined);
    const before = process.getActiveResourcesInfo().filter((kind) => kind === 'Timeout').length;
    await idle.around(async () => undefined);
    const after = process.getActiveResourcesInfo().filter((kind) => kind === 'Timeout').length;
    expect(after).toBe(before);
    await idle.stop();
  });
});

describe('the idle time option', () => {
  it('idleCleanSeconds: 5 by default, 0 off, fractions allowed; anything else is refused by name', () => {
    expect(idleCleanDelayMs(undefined)).toBe(5000);
    expect(idleCleanDelayMs(0)).toBe(0);
    expect(idleCleanDelayMs(0.25)).toBe(250);
    for (const bad of [-1, Number.NaN, Infinity, 1e9, '5' as unknown as number]) {
      expect(() => idleCleanDelayMs(bad)).toThrow(InvalidArgumentError);
      expect(() => idleCleanDelayMs(bad)).toThrow(/idleCleanSeconds .* is not a number of seconds from 0 to 2147483 \(0 turns idle clean off\)/);
    }
  });

  it('--idle-clean SECONDS: a non-negative number', () => {
    expect(parseIdleCleanSeconds('0')).toBe(0);
    expect(parseIdleCleanSeconds('1')).toBe(1);
    expect(parseIdleCleanSeconds('0.5')).toBe(0.5);
    expect(parseIdleCleanSeconds('30')).toBe(30);
    for (const bad of ['', '-1', 'abc', '1s', '5m', '1e3', '0x10', 'NaN', '3000000']) {
      expect(() => parseIdleCleanSeconds(bad), bad).toThrow(
        `invalid --idle-clean '${bad}': expected a number of seconds from 0 to 2147483 (0 turns idle clean off)`,
      );
    }
  });

  it('openImage refuses a bad idleCleanSeconds before it opens anything', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'disk.qed');
    await createImage(path, 'qed', { size: MiB });
    const before = await readFile(path);
    await expect(openImage(path, { idleCleanSeconds: -1 })).rejects.toThrow(/idleCleanSeconds -1 is not a number of seconds/);
    expect((await readFile(path)).equals(before)).toBe(true);
    // Nothing is left open or locked: a read-write open works.
    const image = await openImage(path, { idleCleanSeconds: 0 });
    await image.close();
  });
});

/** Opens `path` read-write through `driver` over a spy protocol, as openImage would, with idle clean after `idleCleanMs`. */
async function openOverSpy(path: string, driver: FormatDriver, idleCleanMs: number) {
  const spy = await spyProtocol(path, false);
  const files = new ImageFileGate(path, {}, true);
  const image: FormatImage = await driver.open(spy, { readOnly: false, files });
  const block = new BlockImageClass({ path, format: driver.name, file: spy, image, gate: files, idleCleanMs });
  return { spy, image, block };
}

const DRIVERS = [
  { format: 'qed', driver: qed, bit: qedNeedCheck, header: /^write 0 \d+$/, options: { cluster_size: '4096' } },
  { format: 'qcow2', driver: qcow2, bit: qcow2Dirty, header: /^write 72 8$/, options: { lazy_refcounts: 'on', cluster_size: '4096' } },
] as const;

describe('QED and qcow2 (lazy refcounts) with a fake clock: the bit is cleared only after the idle time', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  for (const shape of DRIVERS) {
    it(`${shape.format}: set by the first write, still set 4.9 s after each write, cleared 5 s after the last`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, `disk.${shape.format}`);
      await createImage(path, shape.format, { size: 4 * MiB, options: { ...shape.options } });
      vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'performance'] });
      const { block } = await openOverSpy(path, shape.driver, 5000);
      try {
        await block.write(0, seededBytes(1, 100 * KiB));
        expect(await shape.bit(path)).toBe(true);
        await vi.advanceTimersByTimeAsync(4900);
        await settleIo();
        expect(await shape.bit(path)).toBe(true);
        await block.write(MiB, seededBytes(2, 10 * KiB));
        await vi.advanceTimersByTimeAsync(4900);
        await settleIo();
        expect(await shape.bit(path)).toBe(true);
        expect((await block.info()).dirty).toBe(true);
        await vi.advanceTimersByTimeAsync(100);
        // The header write, then its flush; info() follows once the flush returned.
        for (let i = 0; i < 100 && ((await shape.bit(path)) || (await block.info()).dirty); i++) await settleIo();
        expect(await shape.bit(path)).toBe(false);
        expect((await block.info()).dirty).toBe(false);
      } finally {
        await block.close();
      }
    });
  }
});

describe('after an idle clean, the next allocating write marks the image before anything else is written', () => {
  for (const shape of DRIVERS) {
    it(`${shape.format}: the clean flushes, writes the header, flushes; the next allocation writes and flushes the header first`, async () => {
      const dir = await makeTempDir();
      const path = join(dir, `order.${shape.format}`);
      await createImage(path, shape.format, { size: 4 * MiB, options: { ...shape.options } });
      const { spy, image, block } = await openOverSpy(path, shape.driver, 0);
      try {
        await block.write(0, seededBytes(1, 8 * KiB));
        spy.calls.length = 0;
        await image.markClean!();
        expect((await block.info()).dirty).toBe(false);
        const clean = spy.calls.filter((call) => call.startsWith('write') || call === 'flush');
        expect(clean.slice(-3)).toEqual(['flush', expect.stringMatching(shape.header), 'flush']);
        expect(clean.filter((call) => shape.header.test(call))).toHaveLength(1);

        spy.calls.length = 0;
        await block.write(MiB, seededBytes(2, 8 * KiB));
        const writes = spy.calls.filter((call) => call.startsWith('write') || call === 'flush');
        expect(writes[0]).toMatch(shape.header);
        expect(writes[1]).toBe('flush');
        expect(writes.length).toBeGreaterThan(2);
        expect((await block.info()).dirty).toBe(true);

        // A write into a cluster allocated already changes no metadata: no header write, no flush.
        await image.markClean!();
        spy.calls.length = 0;
        await block.write(MiB + 100, seededBytes(3, 1000));
        expect(spy.calls.filter((call) => call.startsWith('write') || call === 'flush')).toEqual([expect.stringMatching(/^write \d+ 1000$/)]);
        expect((await block.info()).dirty).toBe(false);
      } finally {
        await block.close();
      }
    });
  }
});

describe('qcow2 without lazy refcounts: the idle clean has no bit to clear', () => {
  it('writes the pending L2 entries and refcounts, ends with a flush, and leaves the header alone', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'plain.qcow2');
    await createImage(path, 'qcow2', { size: 4 * MiB, options: { cluster_size: '4096' } });
    const header = (await readFile(path)).subarray(0, 104);
    const { spy, image, block } = await openOverSpy(path, qcow2, 0);
    try {
      await block.write(0, seededBytes(1, 64 * KiB));
      spy.calls.length = 0;
      await image.markClean!();
      const calls = spy.calls.filter((call) => call.startsWith('write') || call === 'flush');
      // Refcounts, a flush, the pending L2 entries (and freed references), and the final flush.
      expect(calls.length).toBeGreaterThan(2);
      expect(calls[calls.length - 1]).toBe('flush');
      expect(calls.some((call) => /^write (\d+) /.exec(call) !== null && Number(/^write (\d+) /.exec(call)![1]) < 104)).toBe(false);
      expect((await readFile(path)).subarray(0, 104).equals(header)).toBe(true);
      // Nothing pending any more: a second clean only flushes.
      spy.calls.length = 0;
      await image.markClean!();
      expect(spy.calls.filter((call) => call.startsWith('write') || call === 'flush')).toEqual(['flush']);
    } finally {
      await block.close();
    }
  });
});

describe.skipIf(skipWithoutQemu('idle clean of real images'))('idle clean of real images (short idle time, real clock)', () => {
  interface Shape {
    name: string;
    format: 'qed' | 'qcow2';
    create: string[];
    /** The mark a crash leaves, read from the file; undefined when the format has none (qcow2 without lazy refcounts). */
    marked?: (path: string) => Promise<boolean>;
  }
  const SHAPES: Shape[] = [
    { name: 'QED', format: 'qed', create: ['-o', 'cluster_size=4096'], marked: qedNeedCheck },
    { name: 'qcow2, lazy refcounts', format: 'qcow2', create: ['-o', 'lazy_refcounts=on,cluster_size=4096'], marked: qcow2Dirty },
    { name: 'qcow2', format: 'qcow2', create: ['-o', 'cluster_size=4096'] },
  ];

  for (const shape of SHAPES) {
    it(`${shape.name}: a copy taken after the idle time (what kill -9 leaves) is clean, needs no repair, and holds the data`, { timeout: 60_000 }, async () => {
      const dir = await makeTempDir();
      const path = join(dir, `disk.${shape.format}`);
      await qemuImg(['create', '-q', '-f', shape.format, ...shape.create, path, '8M']);
      const image: BlockImage = await openImage(path, { idleCleanSeconds: 0.3 });
      const expected = Buffer.alloc(8 * MiB);
      try {
        for (let i = 0; i < 40; i++) {
          const data = seededBytes(i, 3 * KiB + i * 100);
          const offset = (i * 197 * KiB + i * 511) % (8 * MiB - data.length);
          await image.write(offset, data);
          data.copy(expected, offset);
        }
        if (shape.marked) {
          expect(await shape.marked(path)).toBe(true);
          await waitUntil('the idle clean', async () => !(await shape.marked!(path)));
        } else {
          await new Promise((resolve) => setTimeout(resolve, 1500));
        }
        const crashed = join(dir, `crashed.${shape.format}`);
        await copyFile(path, crashed);

        const check = await run('qemu-img', ['check', '--output=json', crashed]);
        expect(check.code, check.stdout + check.stderr).toBe(0);
        const report = JSON.parse(check.stdout) as { leaks?: number; corruptions?: number };
        expect(report.leaks ?? 0).toBe(0);
        expect(report.corruptions ?? 0).toBe(0);
        const info = JSON.parse((await run('qemu-img', ['info', '--output=json', crashed])).stdout) as { 'dirty-flag'?: boolean };
        expect(info['dirty-flag'] ?? false).toBe(false);
        const notices: string[] = [];
        const reopened = await openImage(crashed, { notice: (line) => notices.push(line), idleCleanSeconds: 0 });
        try {
          expect(notices).toEqual([]);
          const back = Buffer.alloc(8 * MiB);
          await reopened.read(0, back);
          expect(back.equals(expected)).toBe(true);
        } finally {
          await reopened.close();
        }

        // Written again: marked again at once, and a copy taken now is repaired at its next open.
        const more = seededBytes(99, 20 * KiB);
        await image.write(5 * MiB + 7, more);
        more.copy(expected, 5 * MiB + 7);
        if (shape.marked) {
          expect(await shape.marked(path)).toBe(true);
          const again = join(dir, `again.${shape.format}`);
          await copyFile(path, again);
          const repairNotices: string[] = [];
          const repaired = await openImage(again, { notice: (line) => repairNotices.push(line), idleCleanSeconds: 0 });
          await repaired.close();
          expect(repairNotices.join('\n')).toMatch(/not closed cleanly/);
        }
      } finally {
        await image.close();
      }
      if (shape.marked) expect(await shape.marked(path)).toBe(false);
      const final = await run('qemu-img', ['check', path]);
      expect(final.code, final.stdout + final.stderr).toBe(0);
    });
  }

  it('idleCleanSeconds: 0 keeps the bit set until the close (QED, qcow2 with lazy refcounts)', { timeout: 30_000 }, async () => {
    const dir = await makeTempDir();
    for (const [format, options, marked] of [
      ['qed', 'cluster_size=4096', qedNeedCheck],
      ['qcow2', 'lazy_refcounts=on', qcow2Dirty],
    ] as const) {
      const path = join(dir, `off.${format}`);
      await qemuImg(['create', '-q', '-f', format, '-o', options, path, '4M']);
      const image = await openImage(path, { idleCleanSeconds: 0 });
      try {
        await image.write(0, seededBytes(5, 64 * KiB));
        await image.flush();
        await new Promise((resolve) => setTimeout(resolve, 1200));
        expect(await marked(path), format).toBe(true);
      } finally {
        await image.close();
      }
      expect(await marked(path), format).toBe(false);
    }
  });

  it('a read-write open that writes nothing leaves the file byte for byte as it was, idle time or not', { timeout: 30_000 }, async () => {
    const dir = await makeTempDir();
    for (const [format, options] of [['qed', 'cluster_size=4096'], ['qcow2', 'lazy_refcounts=on']] as const) {
      const path = join(dir, `untouched.${format}`);
      await qemuImg(['create', '-q', '-f', format, '-o', options, path, '4M']);
      await run('qemu-io', ['-f', format, '-c', 'write -P 0x42 0 64k', path]);
      const before = await readFile(path);
      const image = await openImage(path, { idleCleanSeconds: 0.1 });
      await image.read(0, Buffer.alloc(128 * KiB));
      await image.flush();
      await new Promise((resolve) => setTimeout(resolve, 500));
      expect((await readFile(path)).equals(before), format).toBe(true);
      await image.close();
      expect((await readFile(path)).equals(before), format).toBe(true);
    }
  });
});
