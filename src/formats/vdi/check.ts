/**
 * The VDI consistency check, with qemu-img check's rules (block/vdi.c
 * vdi_co_check) and messages: every allocated block map entry is an index
 * below blocks_in_image, no data block is used by two entries, and the
 * header's blocks_allocated equals the number of allocated entries. One more
 * rule of this program's reads: an entry whose block (the bytes of it the
 * disk uses) is not wholly inside the file is a corruption (qemu reads zeros
 * past the end of the file there).
 *
 * There is no repair, as in qemu (qemu-img check -r refuses VDI images): a
 * duplicate or leaked block can only be fixed by moving blocks, and the one
 * harmless case a crash of this program leaves (blocks_allocated above the
 * entries, see image.ts) loses nothing and is filled by the next
 * allocation. Read-only; no concurrency.
 */
import { UnsupportedFeatureError } from '../../block/errors.js';
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { entryProblem, isAllocated, type BlockMap } from './bmap.js';
import type { VdiHeader } from './header.js';

export function checkVdi(file: Protocol, header: VdiHeader, bmap: BlockMap, fileSize: number, options: CheckOptions): CheckResult {
  if (options.repair) {
    throw new UnsupportedFeatureError(`${file.path}: VDI images cannot be repaired (qemu-img check -r refuses them too); check without repair reports the problems`);
  }
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const { blocksInImage } = header;
  /** For each data-area index, 1 + the first entry that uses it (0: unused). */
  const users = new Uint32Array(blocksInImage);
  let allocated = 0;
  for (let block = 0; block < blocksInImage; block++) {
    if (block % 65536 === 0) options.progress?.(block, blocksInImage);
    const entry = bmap.get(block);
    if (!isAllocated(entry)) continue;
    if (entry >= blocksInImage) {
      result.corruptions += 1;
      result.messages.push(`ERROR: block map entry ${block}: block index ${entry} is too large (blocks_in_image ${blocksInImage})`);
      continue;
    }
    allocated += 1;
    if (users[entry] !== 0) {
      result.corruptions += 1;
      result.messages.push(`ERROR: block map entry ${block}: block index ${entry} is also used by entry ${users[entry]! - 1}`);
      continue;
    }
    users[entry] = block + 1;
    const problem = entryProblem(header, block, entry, fileSize);
    if (problem !== undefined) {
      result.corruptions += 1;
      result.messages.push(`ERROR: block map entry ${block}: block ${problem}`);
    }
  }
  options.progress?.(blocksInImage, blocksInImage);
  if (allocated !== header.blocksAllocated) {
    result.corruptions += 1;
    result.messages.push(`ERROR: allocated blocks mismatch: the block map has ${allocated}, the header's blocks_allocated says ${header.blocksAllocated}`);
  }
  return result;
}
