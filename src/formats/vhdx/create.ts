/**
 * Creating a VHDX the way `qemu-img create -f vhdx` does, with its option
 * names and defaults: subformat=dynamic|fixed, block_size (0 or absent: by
 * size, 8 MiB up to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB
 * above), log_size (a multiple of 1 MiB, default 1 MiB), block_state_zero
 * (default on: every block ZERO; off: NOT_PRESENT, or for a fixed image
 * FULLY_PRESENT blocks laid out in order). The size is rounded up to 512
 * bytes (the logical sector). Everything is validated before the file is
 * touched.
 *
 * Layout (qemu 7.2's): file identifier, two headers (sequence numbers 1 and
 * 2, the same GUIDs, no log GUID), two region table copies in the first MiB;
 * the log at 1 MiB; the BAT after it (its length rounded up to 1 MiB); the
 * metadata region (1 MiB: table, then file parameters, virtual disk size,
 * page 83 data, logical and physical sector size of 512) after the BAT;
 * payload blocks from 4 MiB past the metadata region's end.
 *
 * Concurrency: the file is new and ours alone (the generic layer holds the
 * write lock when --force overwrites one).
 */
import { open } from 'node:fs/promises';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import { parseSize } from '../../block/size.js';
import type { CreateOptions } from '../../block/types.js';
import { rejectUnknownOptions } from '../options.js';
import { FULLY_PRESENT, NOT_PRESENT, ZERO } from './bat.js';
import {
  FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION_BYTES, MiB, newGuid, REGION_TABLE_OFFSETS, serializeHeader, serializeRegionTable, type VhdxHeader,
} from './header.js';
import {
  FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE, PAGE_83_DATA, PHYSICAL_SECTOR_SIZE, VIRTUAL_DISK_SIZE,
} from './metadata.js';

export const CREATE_OPTIONS = ['subformat', 'block_size', 'log_size', 'block_state_zero'] as const;

const SECTOR = 512;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
/** The largest log accepted here (what the reader reads back: log.ts' MAX_LOG_BYTES). */
const MAX_LOG_SIZE = 256 * MiB;
const METADATA_REGION_BYTES = MiB;
/** qemu 7.2 starts payload blocks this far past the metadata region's end. */
const DATA_GAP = 4 * MiB;
/** Payload sectors one sector bitmap block covers (2^23), times 512-byte sectors. */
const CHUNK_BYTES = (1 << 23) * SECTOR;

function parseBool(text: string, name: string): boolean {
  if (['on', 'true', 'yes'].includes(text)) return true;
  if (['off', 'false', 'no'].includes(text)) return false;
  throw new InvalidArgumentError(`${name} '${text}' is not on or off`);
}

/** qemu's block size for an image of `size` bytes when none is given. */
export function defaultBlockSize(size: number): number {
  if (size > 32 * TiB) return 64 * MiB;
  if (size > 100 * GiB) return 32 * MiB;
  if (size > GiB) return 16 * MiB;
  return 8 * MiB;
}

export interface VhdxCreatePlan {
  size: number;
  fixed: boolean;
  blockSize: number;
  logSize: number;
  zeroBlocks: boolean;
  batOffset: number;
  batLength: number;
  metadataOffset: number;
  dataOffset: number;
  /** BAT entries (payload and sector bitmap) the image needs. */
  entries: number;
  chunkRatio: number;
}

/** Validates the options and computes the layout. */
export function planCreate(options: CreateOptions): VhdxCreatePlan {
  rejectUnknownOptions('vhdx', options.options, CREATE_OPTIONS);
  if (options.backingFile !== undefined) {
    throw new InvalidArgumentError('vhdx: a backing file (a differencing VHDX) cannot be created; qemu-img cannot either');
  }
  const o = options.options ?? {};
  const subformat = o.subformat ?? 'dynamic';
  if (subformat !== 'dynamic' && subformat !== 'fixed') throw new InvalidArgumentError(`subformat '${subformat}' is not dynamic or fixed`);
  if (!Number.isSafeInteger(options.size) || options.size <= 0) {
    throw new InvalidArgumentError(`size ${options.size} is not a whole number of bytes from 1 to 64 TiB (a VHDX disk is never empty)`);
  }
  const size = Math.ceil(options.size / SECTOR) * SECTOR;
  if (size > MAX_VIRTUAL_SIZE) throw new InvalidArgumentError(`size ${options.size} is larger than the 64 TiB (${MAX_VIRTUAL_SIZE} bytes) a VHDX may have`);
  const given = o.block_size !== undefined ? parseSize(o.block_size, 'block_size') : 0;
  const blockSize = given === 0 ? defaultBlockSize(size) : given;
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new InvalidArgumentError(`block_size ${blockSize} is not a power of two from 1 MiB to 256 MiB (0: chosen by size)`);
  }
  const logSize = o.log_size !== undefined ? parseSize(o.log_size, 'log_size') : MiB;
  if (logSize < MiB || logSize % MiB !== 0 || logSize > MAX_LOG_SIZE) {
    throw new InvalidArgumentError(`log_size ${logSize} is not a multiple of 1 MiB from 1 MiB to 256 MiB`);
  }
  const zeroBlocks = o.block_state_zero !== undefined ? parseBool(o.block_state_zero, 'block_state_zero') : true;
  const chunkRatio = CHUNK_BYTES / blockSize;
  const payloadBlocks = Math.ceil(size / blockSize);
  const entries = payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  const batOffset = HEADER_SECTION_BYTES + logSize;
  const batLength = Math.ceil((entries * 8) / MiB) * MiB;
  const metadataOffset = batOffset + batLength;
  const dataOffset = metadataOffset + METADATA_REGION_BYTES + DATA_GAP;
  return { size, fixed: subformat === 'fixed', blockSize, logSize, zeroBlocks, batOffset, batLength, metadataOffset, dataOffset, entries, chunkRatio };
}

/** The metadata region's first bytes: the table and its five items. */
function metadataBytes(plan: VhdxCreatePlan): Buffer {
  const bytes = Buffer.alloc(64 * 1024 + 40);
  bytes.write('metadata', 0, 'latin1');
  const items: Array<[Buffer, Buffer, number]> = [];
  const params = Buffer.alloc(8);
  params.writeUInt32LE(plan.blockSize, 0);
  params.writeUInt32LE(plan.fixed ? 1 : 0, 4); // LeaveBlocksAllocated
  items.push([FILE_PARAMETERS, params, 4]);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(plan.size));
  items.push([VIRTUAL_DISK_SIZE, size, 6]);
  items.push([PAGE_83_DATA, newGuid(), 6]);
  const sector = Buffer.alloc(4);
  sector.writeUInt32LE(SECTOR);
  items.push([LOGICAL_SECTOR_SIZE, sector, 6]);
  items.push([PHYSICAL_SECTOR_SIZE, sector, 6]);
  bytes.writeUInt16LE(items.length, 10);
  let offset = 64 * 1024;
  items.forEach(([id, value, flags], i) => {
    const at = 32 + 32 * i;
    id.copy(bytes, at);
    bytes.writeUInt32LE(offset, at + 16);
    bytes.writeUInt32LE(value.length, at + 20);
    bytes.writeUInt32LE(flags, at + 24); // 2: IsVirtualDisk, 4: IsRequired
    value.copy(bytes, offset);
    offset += value.length;
  });
  return bytes;
}

/**
 * Writes the BAT one 1 MiB piece at a time: every payload entry ZERO,
 * NOT_PRESENT (the file's zeros, nothing written) or (fixed,
 * block_state_zero=off) FULLY_PRESENT in order; sector bitmap entries 0.
 */
async function writeBat(plan: VhdxCreatePlan, write: (bytes: Buffer, at: number) => Promise<unknown>): Promise<void> {
  const state = plan.zeroBlocks ? ZERO : plan.fixed ? FULLY_PRESENT : NOT_PRESENT;
  if (state === NOT_PRESENT) return;
  const perPiece = MiB / 8;
  let block = 0;
  for (let first = 0; first < plan.entries; first += perPiece) {
    const count = Math.min(perPiece, plan.entries - first);
    const piece = Buffer.alloc(count * 8);
    for (let i = 0; i < count; i++) {
      if ((first + i) % (plan.chunkRatio + 1) === plan.chunkRatio) continue;
      const offset = state === FULLY_PRESENT ? BigInt(plan.dataOffset + block * plan.blockSize) : 0n;
      piece.writeBigUInt64LE(offset | BigInt(state), i * 8);
      block += 1;
    }
    await write(piece, plan.batOffset + first * 8);
  }
}

export async function createVhdx(path: string, options: CreateOptions): Promise<void> {
  const plan = planCreate(options);
  const identifier = Buffer.alloc(64 * 1024);
  FILE_SIGNATURE.copy(identifier, 0);
  identifier.write('imgmount', 8, 'utf16le');
  const fileWriteGuid = newGuid();
  const dataWriteGuid = newGuid();
  const header = (index: number): VhdxHeader => ({
    index,
    sequenceNumber: BigInt(index + 1),
    fileWriteGuid,
    dataWriteGuid,
    logGuid: Buffer.alloc(16),
    logVersion: 0,
    version: 1,
    logLength: plan.logSize,
    logOffset: HEADER_SECTION_BYTES,
  });
  const regions = serializeRegionTable({ fileOffset: plan.batOffset, length: plan.batLength }, { fileOffset: plan.metadataOffset, length: METADATA_REGION_BYTES });
  const length = plan.fixed ? plan.dataOffset + plan.size : plan.dataOffset;
  try {
    const handle = await open(path, 'w');
    try {
      await handle.truncate(length);
      await handle.write(identifier, 0, identifier.length, 0);
      for (const index of [0, 1]) await handle.write(serializeHeader(header(index)), 0, 4096, HEADER_OFFSETS[index]);
      for (const at of REGION_TABLE_OFFSETS) await handle.write(regions, 0, regions.length, at);
      await writeBat(plan, (bytes, at) => handle.write(bytes, 0, bytes.length, at));
      const metadata = metadataBytes(plan);
      await handle.write(metadata, 0, metadata.length, plan.metadataOffset);
      await handle.datasync();
    } finally {
      await handle.close();
    }
  } catch (error) {
    throw hostIoError('cannot create', path, error);
  }
}
