/**
 * CRC-32C (Castagnoli) as VHDX uses it: the headers, region tables and log
 * entries carry a checksum computed over the structure with its own checksum
 * field taken as zero. The only module that imports the native package
 * @node-rs/crc32 (the CLI bundle marks it external). Pure functions, no state.
 */
import { crc32c } from '@node-rs/crc32';

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
