/**
 * The cloop V2.0 header and offsets table (what create_compressed_fs of
 * Debian's cloop-utils writes and qemu reads): parsing with every check qemu's
 * block/cloop.c makes (the bounds added for CVE-2014-0144..0147: block size,
 * number of blocks, offsets monotonic and each compressed block bounded),
 * each failure naming the field, its value and the allowed range; plus the
 * table inside the file before it is allocated. Pure functions, no I/O.
 *
 * Layout (big-endian): a 128-byte shell script, block_size (u32) at 128,
 * n_blocks (u32) at 132, then n_blocks + 1 absolute u64 offsets at 136: block
 * i is the zlib stream at [offsets[i], offsets[i + 1]) that inflates to
 * block_size bytes.
 */
import { CorruptImageError } from '../../block/errors.js';

export const SCRIPT = Buffer.from('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n', 'latin1');
export const HEADER_BYTES = 136;
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/** qemu: n_blocks <= (UINT32_MAX - 1) / 8, and the offsets table at most 512 MiB. */
export const MAX_BLOCKS = Math.floor((0xffffffff - 1) / 8);
export const MAX_OFFSETS_BYTES = 512 * 1024 * 1024;
/** qemu's bound on one compressed block. */
export const MAX_COMPRESSED_BLOCK = 2 * MAX_BLOCK_SIZE;

export interface CloopHeader {
  blockSize: number;
  blocks: number;
}

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: cloop ${message}`);
}

/** Parses the fields after the script in a file `fileSize` bytes long; the offsets table must fit in it. */
export function parseHeader(bytes: Buffer, fileSize: number, path: string): CloopHeader {
  if (bytes.length < HEADER_BYTES || fileSize < HEADER_BYTES) fail(path, `header is truncated: the file is ${fileSize} bytes, the header needs ${HEADER_BYTES}`);
  const blockSize = bytes.readUInt32BE(128);
  const blocks = bytes.readUInt32BE(132);
  if (blockSize === 0 || blockSize % 512 !== 0 || blockSize > MAX_BLOCK_SIZE) {
    fail(path, `block_size ${blockSize} is not a multiple of 512 in [512, ${MAX_BLOCK_SIZE}]`);
  }
  if (blocks > MAX_BLOCKS || (blocks + 1) * 8 > MAX_OFFSETS_BYTES) {
    fail(path, `n_blocks ${blocks} is not in [0, ${MAX_OFFSETS_BYTES / 8 - 1}] (an offsets table of at most 512 MiB; try a larger block size)`);
  }
  const tableEnd = HEADER_BYTES + (blocks + 1) * 8;
  if (tableEnd > fileSize) fail(path, `n_blocks ${blocks} puts the ${(blocks + 1) * 8}-byte offsets table past the end of the ${fileSize}-byte file (truncated image?)`);
  return { blockSize, blocks };
}

/**
 * Checks the offsets table (n_blocks + 1 big-endian u64) and returns the offsets
 * as numbers: each at most 2^53 - 1, not below the previous one, no block
 * longer than 128 MiB compressed, and the first not inside the header or table.
 */
export function parseOffsets(table: Buffer, header: CloopHeader, path: string): Float64Array {
  const offsets = new Float64Array(header.blocks + 1);
  const tableEnd = HEADER_BYTES + table.length;
  for (let i = 0; i <= header.blocks; i++) {
    const value = table.readBigUInt64BE(8 * i);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) fail(path, `offset ${i} (${value}) is above the largest supported offset 2^53-1`);
    const offset = Number(value);
    if (i === 0 && offset < tableEnd) fail(path, `offset 0 (${offset}) is inside the header and offsets table (${tableEnd} bytes)`);
    if (i > 0) {
      const previous = offsets[i - 1]!;
      if (offset < previous) fail(path, `offsets are not monotonically increasing at index ${i} (${offset} after ${previous})`);
      if (offset - previous > MAX_COMPRESSED_BLOCK) {
        fail(path, `block ${i - 1} is ${offset - previous} bytes compressed, not in [0, ${MAX_COMPRESSED_BLOCK}]`);
      }
    }
    offsets[i] = offset;
  }
  return offsets;
}
