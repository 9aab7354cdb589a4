/**
 * QED need-check counts as set only once it is durable, seen through a
 * protocol that records (and can fail) every call: when the header write or
 * its flush fails, the allocation fails, and the next allocating write writes
 * the header (and flushes) again before any data.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../src/index.js';
import { makeTempDir, openQedOver, readU64, seededBytes, spyProtocol, type SpyProtocol } from './helpers/qemu.js';

const CLUSTER = 4096;

/** A spy protocol whose writes fail (EIO) while `failWrite` says so. */
function failing(spy: SpyProtocol, failWrite: (offset: number, length: number) => boolean): SpyProtocol {
  return {
    ...spy,
    calls: spy.calls,
    readsPastEnd: spy.readsPastEnd,
    async write(offset: number, buffer: Buffer) {
      if (failWrite(offset, buffer.length)) {
        spy.calls.push(`write ${offset} ${buffer.length} (failed)`);
        throw Object.assign(new Error(`injected EIO writing ${buffer.length} bytes at ${offset}`), { code: 'EIO' });
      }
      return spy.write(offset, buffer);
    },
  };
}

async function newImage(name: string, size = 4 * 1024 * 1024): Promise<string> {
  const dir = await makeTempDir();
  const path = join(dir, name);
  await createImage(path, 'qed', { size, options: { cluster_size: String(CLUSTER), table_size: '1' } });
  return path;
}

const needCheckOnDisk = async (path: string): Promise<boolean> => ((await readU64(path, 16)) & 0x02n) !== 0n;

describe('QED need-check is set in memory only once it is on disk', () => {
  it('a failed header write fails the allocation, and the next allocation writes the header again before any data', async () => {
    const path = await newImage('need-check.qed');
    const spy = await spyProtocol(path, false);
    let failHeader = false;
    const protocol = failing(spy, (offset) => failHeader && offset === 0);
    const image = await openQedOver(protocol);

    failHeader = true;
    await expect(image.write(0, seededBytes(1, CLUSTER))).rejects.toThrow(/injected EIO/);
    failHeader = false;
    expect(await needCheckOnDisk(path)).toBe(false);

    spy.calls.length = 0;
    const data = seededBytes(2, CLUSTER);
    await image.write(CLUSTER, data);
    const writes = spy.calls.filter((call) => call.startsWith('write') || call === 'flush');
    // The header (offset 0) and a flush come first; only then the data cluster and the tables.
    expect(writes[0]).toMatch(/^write 0 \d+$/);
    expect(writes[1]).toBe('flush');
    expect(writes.length).toBeGreaterThan(2);
    expect(await needCheckOnDisk(path)).toBe(true);

    const back = Buffer.alloc(CLUSTER);
    await image.read(CLUSTER, back);
    expect(back.equals(data)).toBe(true);
    await image.close();
    expect(await needCheckOnDisk(path)).toBe(false);
  });

  it('a failed flush after the header write fails the allocation, and the next one writes and flushes the header again', async () => {
    const path = await newImage('need-check-flush.qed');
    const spy = await spyProtocol(path, false);
    let failFlush = false;
    const protocol: SpyProtocol = {
      ...failing(spy, () => false),
      async flush() {
        if (failFlush) {
          failFlush = false;
          spy.calls.push('flush (failed)');
          throw Object.assign(new Error('injected EIO on fdatasync'), { code: 'EIO' });
        }
        return spy.flush();
      },
    };
    const image = await openQedOver(protocol);
    failFlush = true;
    await expect(image.write(0, seededBytes(3, CLUSTER))).rejects.toThrow(/injected EIO on fdatasync/);
    expect(spy.calls.filter((call) => call.startsWith('write'))).toHaveLength(1); // the header only: no data went out

    spy.calls.length = 0;
    await image.write(0, seededBytes(4, CLUSTER));
    const writes = spy.calls.filter((call) => call.startsWith('write') || call === 'flush');
    expect(writes.slice(0, 2)).toEqual([expect.stringMatching(/^write 0 \d+$/), 'flush']);
    await image.close();
  });
});
