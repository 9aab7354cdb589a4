/**
 * CRC-32C (Castagnoli) as VHDX uses it: the headers, region tables and log
 * entries carry a checksum computed over the structure with its own checksum
 * field taken as zero. The only module that loads the native package
 * @node-rs/crc32 (the CLI bundle marks it external), and only when a VHDX
 * structure is first checked: every other command starts without loading a
 * native module it does not use. Pure functions; the loaded package is kept.
 */
import { createRequire } from 'node:module';

type Crc32c = (input: Buffer, initialState?: number) => number;
let loaded: Crc32c | undefined;

function crc32c(input: Buffer, initialState?: number): number {
  loaded ??= (createRequire(import.meta.url)('@node-rs/crc32') as { crc32c: Crc32c }).crc32c;
  return loaded(input, initialState);
}

/** CRC-32C of `buffer` with the 4 bytes at `checksumOffset` counted as zeros (the buffer is not changed). */
export function vhdxChecksum(buffer: Buffer, checksumOffset: number): number {
  const before = crc32c(buffer.subarray(0, checksumOffset));
  const withZeros = crc32c(Buffer.alloc(4), before);
  return crc32c(buffer.subarray(checksumOffset + 4), withZeros) >>> 0;
}

/** True when the checksum stored (little-endian) at `checksumOffset` matches the structure. */
export function checksumMatches(buffer: Buffer, checksumOffset: number): boolean {
  return buffer.readUInt32LE(checksumOffset) === vhdxChecksum(buffer, checksumOffset);
}
