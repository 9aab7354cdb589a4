/**
 * The qcow2 bitmap directory (persistent dirty bitmaps, for incremental
 * backups), read only to list the bitmaps in `info` as qemu-img does. The
 * directory is used only when the bitmaps autoclear bit says it is
 * consistent with the image.
 *
 * Entry layout (big-endian, padded to 8 bytes): 0 bitmap_table_offset u64,
 * 8 bitmap_table_size u32, 12 flags u32 (bit 0 in_use, bit 1 auto),
 * 16 type u8, 17 granularity_bits u8, 18 name_size u16, 20 extra_data_size u32,
 * then the extra data and the name.
 */
import { CorruptImageError } from '../../block/errors.js';
import type { Protocol } from '../../block/types.js';
import type { BitmapsExtension } from './extensions.js';

/** qemu's bound on the bitmap directory. */
export const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;

export interface BitmapInfo {
  flags: string[];
  name: string;
  granularity: number;
}

export async function readBitmaps(file: Protocol, extension: BitmapsExtension, fileSize: number): Promise<BitmapInfo[]> {
  const fail = (message: string): never => {
    throw new CorruptImageError(`${file.path}: qcow2 bitmap directory: ${message}`);
  };
  const { directoryOffset, directorySize, count } = extension;
  if (directorySize < 0 || directorySize > MAX_DIRECTORY_BYTES) fail(`size ${directorySize} is outside [0, ${MAX_DIRECTORY_BYTES}]`);
  if (directoryOffset < 0 || directoryOffset + directorySize > fileSize) fail(`offset ${directoryOffset} (+${directorySize} bytes) lies outside the file`);
  const directory = Buffer.alloc(directorySize);
  await file.read(directoryOffset, directory);
  const bitmaps: BitmapInfo[] = [];
  let at = 0;
  for (let index = 0; index < count; index++) {
    if (at + 24 > directory.length) fail(`entry ${index} runs past the directory`);
    const flagBits = directory.readUInt32BE(at + 12);
    const granularityBits = directory[at + 17]!;
    const nameSize = directory.readUInt16BE(at + 18);
    const extraSize = directory.readUInt32BE(at + 20);
    const nameStart = at + 24 + extraSize;
    if (nameStart + nameSize > directory.length) fail(`entry ${index} runs past the directory`);
    if (granularityBits < 9 || granularityBits > 31) fail(`entry ${index} has granularity_bits ${granularityBits}, outside [9, 31]`);
    const flags: string[] = [];
    if (flagBits & 1) flags.push('in-use');
    if (flagBits & 2) flags.push('auto');
    bitmaps.push({ flags, name: directory.subarray(nameStart, nameStart + nameSize).toString('utf8'), granularity: 2 ** granularityBits });
    at = Math.ceil((nameStart + nameSize) / 8) * 8;
  }
  return bitmaps;
}
