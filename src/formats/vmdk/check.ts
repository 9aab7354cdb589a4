/**
 * `check` for VMDK, what qemu-img check looks at (qemu's vmdk_co_check) and a
 * little more: in every sparse extent (the image's own file, or each sparse
 * extent a descriptor file lists, opened through the same confined gate as
 * open), every grain directory entry must name a grain table inside the file
 * and every allocated grain must start inside it, at or after grain_offset
 * (qemu does not look at that: it would read the metadata as data). Each bad entry is one
 * corruption, with a line naming it. Repair is not offered (qemu has none
 * either). Read-only; nothing is cached between calls.
 */
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import { ImageFileGate } from '../../block/gate.js';
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { SparseExtent } from './extent.js';
import { FLAG_ZERO_GRAIN, SECTOR, embeddedDescriptorOnly, isSparseHeader, type SparseHeader } from './header.js';
import { VmdkImage } from './image.js';
import { openVmdk, readSparse } from './open.js';

const log = createDebug('imgmount:vmdk');

interface Tables {
  file: Protocol;
  header: SparseHeader;
  gd: Uint32Array;
  fileSize: number;
  /** Prefix of the messages: the extent file, when it is not the image's own. */
  label: string;
}

export async function checkVmdk(file: Protocol, options: CheckOptions): Promise<CheckResult> {
  const result: CheckResult = { corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const head = Buffer.alloc(SECTOR);
  await file.read(0, head);
  const fileSize = await file.size();
  if (isSparseHeader(head) && !embeddedDescriptorOnly(head)) {
    const { header, gd } = await readSparse(file, fileSize);
    await checkTables({ file, header, gd, fileSize, label: '' }, result, options);
  } else {
    // a descriptor: check its sparse extents (flat ones have no tables)
    const gate = new ImageFileGate(file.path, {}, false);
    try {
      const image = await openVmdk(file, { readOnly: true, files: gate });
      const extents = image instanceof VmdkImage ? image.sparseExtents() : [];
      for (const extent of extents) {
        await checkTables({ file: extent.file, header: extent.header, gd: extent.directory, fileSize: extent.fileBytes, label: `${extent.file.path}: ` }, result, options);
      }
      // COWD and seSparse extents: every entry a read would refuse
      for (const extent of image instanceof VmdkImage ? image.tableExtents() : []) {
        const lines = await extent.problems(options.progress);
        result.corruptions += lines.length;
        result.messages.push(...lines);
      }
    } finally {
      await gate.closeAll();
    }
  }
  if (options.repair && result.corruptions > 0) throw new CorruptImageError(`${file.path}: VMDK images cannot be repaired`);
  // qemu-img check shows no allocation figures for VMDK; neither does this
  return result;
}

async function checkTables(tables: Tables, result: CheckResult, options: CheckOptions): Promise<void> {
  const { file, header, gd, fileSize, label } = tables;
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
      result.messages.push(`${label}grain directory entry ${gdIndex}: grain table at sector ${sector} lies outside the file (${fileSize} bytes)`);
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
      if (entry < header.grainOffset) {
        result.corruptions += 1;
        result.messages.push(`${label}grain ${grain} (guest offset ${grain * header.granularity * SECTOR}): sector ${entry} is inside the metadata (grains start at sector ${header.grainOffset})`);
      } else if (entry * SECTOR >= fileSize) {
        result.corruptions += 1;
        result.messages.push(`${label}grain ${grain} (guest offset ${grain * header.granularity * SECTOR}): sector ${entry} points after the end of the file (${fileSize} bytes)`);
      }
    }
  }
  options.progress?.(gd.length, gd.length);
  log('%s: %d of %d grains allocated, %d corruption(s) so far', file.path, allocated, grainsTotal, result.corruptions);
}
