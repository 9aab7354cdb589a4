/**
 * `check` for VHDX (it repairs nothing; a read-write check, `check -r`,
 * replays a pending log on disk first, as `qemu-img check -r all` does, and
 * says so): every BAT entry is decoded; blocks outside the file or on the header
 * section, log, BAT or metadata region, reserved states, partially present
 * blocks outside a differencing image, bad sector bitmap entries and blocks
 * that overlap each other are corruptions. A log that must be replayed is
 * otherwise replayed in memory first and reported. Reads the BAT one 1 MiB page at a time.
 */
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import {
  blockProblem, decodeEntry, FULLY_PRESENT, NOT_PRESENT, PARTIALLY_PRESENT, reservedRanges, SB_BLOCK_PRESENT, BITMAP_BYTES, UNDEFINED, UNMAPPED,
  UNMAPPED_V095, ZERO,
} from './bat.js';
import { MiB } from './header.js';
import { openParts } from './open.js';

const PAGE_ENTRIES = MiB / 8;

export async function checkVhdx(file: Protocol, options: CheckOptions): Promise<CheckResult> {
  const messages: string[] = [];
  const { parts, view } = await openParts(file, (line) => messages.push(line));
  const { geometry, metadata, regions, fileSize } = parts;
  const reserved = reservedRanges(parts.header, regions);
  let corruptions = 0;
  let allocated = 0;
  let end = 0;
  const used: Array<{ start: number; end: number; what: string }> = [];
  const page = Buffer.alloc(MiB);
  for (let first = 0; first < geometry.entries; first += PAGE_ENTRIES) {
    await view.read(regions.bat.fileOffset + first * 8, page);
    const count = Math.min(PAGE_ENTRIES, geometry.entries - first);
    for (let i = 0; i < count; i++) {
      const index = first + i;
      const { state, offset } = decodeEntry(page.readBigUInt64LE(i * 8));
      const isBitmap = index % (geometry.chunkRatio + 1) === geometry.chunkRatio;
      if (isBitmap) {
        if (!metadata.hasParent || state === NOT_PRESENT) continue;
        const problem = state === SB_BLOCK_PRESENT ? blockProblem(offset, BITMAP_BYTES, fileSize, reserved) : `state ${state}, which is reserved`;
        if (problem) {
          corruptions += 1;
          messages.push(`BAT entry ${index} (a sector bitmap block): ${problem}`);
        } else {
          used.push({ start: offset!, end: offset! + BITMAP_BYTES, what: `the sector bitmap of BAT entry ${index}` });
          end = Math.max(end, offset! + BITMAP_BYTES);
        }
        continue;
      }
      const block = index - Math.floor(index / (geometry.chunkRatio + 1));
      if (block >= geometry.payloadBlocks) continue;
      if ([NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095].includes(state)) continue;
      if (state !== FULLY_PRESENT && state !== PARTIALLY_PRESENT) {
        corruptions += 1;
        messages.push(`BAT entry ${index} (payload block ${block}): state ${state}, which is reserved`);
        continue;
      }
      if (state === PARTIALLY_PRESENT && !metadata.hasParent) {
        corruptions += 1;
        messages.push(`BAT entry ${index} (payload block ${block}): PARTIALLY_PRESENT in an image without a parent`);
        continue;
      }
      const length = Math.min(geometry.blockSize, metadata.virtualSize - block * geometry.blockSize);
      const problem = blockProblem(offset, length, fileSize, reserved);
      if (problem) {
        corruptions += 1;
        messages.push(`BAT entry ${index} (payload block ${block}): ${problem}`);
        continue;
      }
      allocated += 1;
      used.push({ start: offset!, end: offset! + length, what: `payload block ${block}` });
      end = Math.max(end, offset! + length);
    }
    options.progress?.(Math.min(geometry.entries, first + PAGE_ENTRIES), geometry.entries);
  }
  used.sort((a, b) => a.start - b.start);
  for (let i = 1; i < used.length; i++) {
    if (used[i]!.start < used[i - 1]!.end) {
      corruptions += 1;
      messages.push(`${used[i]!.what} at ${used[i]!.start} overlaps ${used[i - 1]!.what} at ${used[i - 1]!.start}`);
    }
  }
  return {
    corruptions,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    messages,
    imageEndOffset: Math.max(end, regions.bat.fileOffset + regions.bat.length, regions.metadata.fileOffset + regions.metadata.length),
    totalClusters: geometry.payloadBlocks,
    allocatedClusters: allocated,
  };
}
