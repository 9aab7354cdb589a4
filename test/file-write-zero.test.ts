/**
 * The file protocol's write loop: short writes are repeated until every byte
 * is written, and a pwrite that writes nothing (returns 0) fails with EIO
 * naming the file and the offset instead of retrying forever.
 */
import { constants as osConstants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { writeFully, type PositionalWrite } from '../src/block/file.js';
import { HostIoError } from '../src/index.js';

describe('FileProtocol write loop', () => {
  it('repeats short writes until every byte is written', async () => {
    const file = Buffer.alloc(64);
    const short: PositionalWrite = async (_fd, buffer, at, length, position) => {
      const n = Math.min(length, 5);
      buffer.copy(file, position, at, at + n);
      return n;
    };
    const data = Buffer.from('0123456789abcdefghijklmnopqrstuvwxyz');
    await writeFully(short, 3, data, 10, '/images/disk.qed');
    expect(file.subarray(10, 10 + data.length).equals(data)).toBe(true);
  });

  it('fails with EIO naming the file and offset when pwrite writes 0 bytes', { timeout: 2000 }, async () => {
    let calls = 0;
    const stuck: PositionalWrite = (_fd, _buffer, at, length) =>
      new Promise((resolve) => setImmediate(() => resolve(++calls === 1 && at === 0 ? Math.min(length, 7) : 0)));
    const failure = writeFully(stuck, 3, Buffer.alloc(100), 4096, '/images/disk.qed');
    await expect(failure).rejects.toBeInstanceOf(HostIoError);
    await expect(failure).rejects.toMatchObject({ errno: osConstants.errno.EIO });
    await expect(failure).rejects.toThrow(/\/images\/disk\.qed.*4103|4103.*\/images\/disk\.qed/);
    expect(calls).toBe(2);
  });
});
