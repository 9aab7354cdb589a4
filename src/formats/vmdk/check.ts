/**
 * `check` for VMDK, what qemu-img check looks at (qemu's vmdk_co_check) and a
 * little more: every grain directory entry of every sparse extent must name a
 * grain table inside the file, and every allocated grain must start inside
 * it. Each bad entry is one corruption, with a line naming it. Repair is not
 * offered (qemu has none either). Read-only; opens the image like open does
 * (so a descriptor's extents go through the same gate).
 */
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { FLAG_ZERO_GRAIN, SECTOR } from './header.js';
import { readSparse } from './open.js';

const log = createDebug('imgmount:vmdk');

export async function checkVmdk(file: Protocol, options: CheckOptions): Promise<CheckResult> {
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const head = Buffer.alloc(4);
  await file.read(0, head);
  if (head.toString('latin1') !== 'KDMV') return result; // a descriptor file has no tables of its own
  const fileSize = await file.size();
  const { header, gd } = await readSparse(file, fileSize);
  const gtBytes = header.numGtesPerGt * 4;
  const zeroGrains = (header.flags & FLAG_ZERO_GRAIN) !== 0;
  const grainsTotal = Math.ceil(header.capacity / header.granularity);
  let allocated = 0;
  for (let gdIndex = 0; gdIndex < gd.length; gdIndex++) {
    options.progress?.(gdIndex, gd.length);
    const sector = gd[gdIndex]!;
    if (sector === 0) continue;
    if (sector * SECTOR + gtBytes > fileSize) {
      result.corruptions += 1;
      result.messages.push(`grain directory entry ${gdIndex}: grain table at sector ${sector} lies outside the file (${fileSize} bytes)`);
      continue;
    }
    const bytes = Buffer.alloc(gtBytes);
    await file.read(sector * SECTOR, bytes);
    for (let i = 0; i < header.numGtesPerGt; i++) {
      const grain = gdIndex * header.numGtesPerGt + i;
      if (grain >= grainsTotal) break;
      const entry = bytes.readUInt32LE(i * 4);
      if (entry === 0 || (entry === 1 && zeroGrains)) continue;
      allocated += 1;
      if (entry * SECTOR >= fileSize) {
        result.corruptions += 1;
        result.messages.push(`grain ${grain} (guest offset ${grain * header.granularity * SECTOR}): sector ${entry} points after the end of the file (${fileSize} bytes)`);
      }
    }
  }
  options.progress?.(gd.length, gd.length);
  if (options.repair && result.corruptions > 0) throw new CorruptImageError(`${file.path}: VMDK images cannot be repaired`);
  log('%s: %d of %d grains allocated, %d corruption(s)', file.path, allocated, grainsTotal, result.corruptions);
  // qemu-img check shows no allocation figures for VMDK; neither does this
  return result;
}
