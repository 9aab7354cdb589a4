/**
 * The decode-ahead policy (src/block/decode-ahead.ts): which ranges a
 * sequential reader of compressed clusters has decoded ahead of it.
 */
import { describe, expect, it } from 'vitest';
import { DecodeAhead } from '../src/block/decode-ahead.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function recorder(length: number): { ahead: DecodeAhead; started: Array<[number, number]> } {
  const started: Array<[number, number]> = [];
  return { ahead: new DecodeAhead(length, (offset, size) => started.push([offset, size])), started };
}

describe('decode ahead', () => {
  it('starts nothing for a first read or reads that jump around', () => {
    const { ahead, started } = recorder(64 * MiB);
    ahead.read(0, 128 * KiB);
    ahead.read(10 * MiB, 128 * KiB);
    ahead.read(3 * MiB, 4 * KiB);
    expect(started).toEqual([]);
  });

  it('a sequential reader gets the next two read lengths (at least 256 KiB) ahead, each range once', () => {
    const { ahead, started } = recorder(64 * MiB);
    ahead.read(0, 128 * KiB);
    ahead.read(128 * KiB, 128 * KiB); // ends at 256 KiB: 256 KiB ahead of that
    ahead.read(256 * KiB, 128 * KiB); // ends at 384 KiB: only what was not started yet
    expect(started).toEqual([
      [256 * KiB, 256 * KiB],
      [512 * KiB, 128 * KiB],
    ]);
  });

  it('1 MiB reads look 2 MiB ahead, large reads at most 4 MiB, never past the end of the image', () => {
    const { ahead, started } = recorder(5 * MiB);
    ahead.read(0, MiB);
    ahead.read(MiB, MiB);
    ahead.read(2 * MiB, 3 * MiB); // ends at the end of the image: nothing more to decode
    expect(started).toEqual([[2 * MiB, 2 * MiB]]);
    const big = recorder(64 * MiB);
    big.ahead.read(0, 8 * MiB);
    big.ahead.read(8 * MiB, 8 * MiB);
    expect(big.started).toEqual([[16 * MiB, 4 * MiB]]);
  });

  it('after a jump, a new sequential run starts its own window', () => {
    const { ahead, started } = recorder(64 * MiB);
    ahead.read(0, 128 * KiB);
    ahead.read(128 * KiB, 128 * KiB);
    ahead.read(32 * MiB, 128 * KiB);
    ahead.read(32 * MiB + 128 * KiB, 128 * KiB);
    expect(started).toEqual([
      [256 * KiB, 256 * KiB],
      [32 * MiB + 256 * KiB, 256 * KiB],
    ]);
  });
});
