/**
 * The binary resource fork of an old DMG (before the XML property list,
 * which hdiutil still writes beside it): a classic resource fork whose data
 * section holds the resources one after another, each a 32-bit big-endian
 * length then its bytes. As qemu (dmg_read_resource_fork) does, the resource
 * map is not read: every resource that starts with "mish" is a blkx block,
 * the others (plst, cSum...) are skipped. Pure function; no state.
 *
 * Header (big-endian): 0 data offset, 4 map offset, 8 data length, 12 map length.
 */
import { CorruptImageError } from '../../block/errors.js';

const HEADER_BYTES = 16;
const MISH = Buffer.from('mish', 'latin1');

function fail(path: string, message: string): never {
  throw new CorruptImageError(`${path}: DMG resource fork ${message}`);
}

/** The mish blocks of the resource fork `fork`, in order. */
export function resourceForkBlocks(fork: Buffer, path: string): { name: string; data: Buffer }[] {
  if (fork.length < HEADER_BYTES) fail(path, `is ${fork.length} bytes, shorter than its ${HEADER_BYTES}-byte header`);
  const dataOffset = fork.readUInt32BE(0);
  const dataLength = fork.readUInt32BE(8);
  if (dataOffset > fork.length) fail(path, `data offset ${dataOffset} is past its end (${fork.length} bytes)`);
  if (dataLength === 0 || dataLength > fork.length - dataOffset) {
    fail(path, `data length ${dataLength} is not in [1, ${fork.length - dataOffset}] (the fork's ${fork.length} bytes from data offset ${dataOffset})`);
  }
  const end = dataOffset + dataLength;
  const blocks: { name: string; data: Buffer }[] = [];
  for (let at = dataOffset; at < end; ) {
    if (end - at < 4) fail(path, `resource at ${at} has no room for its length before the end of the data at ${end}`);
    const length = fork.readUInt32BE(at);
    at += 4;
    if (length === 0 || length > end - at) fail(path, `resource at ${at - 4} has length ${length}, not in [1, ${end - at}] (the end of the data at ${end})`);
    const data = fork.subarray(at, at + length);
    if (data.subarray(0, 4).equals(MISH)) blocks.push({ name: '', data });
    at += length;
  }
  if (blocks.length === 0) fail(path, 'holds no mish (blkx) block: there is no chunk table');
  return blocks;
}
