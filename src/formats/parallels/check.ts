/**
 * `check` of a Parallels image, without repair (the format is read-only
 * here), counting what qemu-img check -f parallels counts: an image not
 * closed cleanly (inuse set) is a corruption, so is each cluster that starts
 * past the end of the file; space after the last allocated cluster is leaked
 * (whole clusters, rounded up). Like qemu's (and qcow2's here), the result
 * also counts fragmented clusters: those not right after the previous one.
 * Reads the header and catalog once; no state.
 */
import type { CheckOptions, CheckResult, Protocol } from '../../block/types.js';
import { HEADER_BYTES, entrySector, parseHeader } from './header.js';

export async function checkParallels(file: Protocol, options: CheckOptions): Promise<CheckResult & { fragmentedClusters: number }> {
  // qemu measures the file in whole sectors (bdrv_getlength rounds up), so its numbers do here too.
  const fileSize = Math.ceil((await file.size()) / 512) * 512;
  const head = Buffer.alloc(HEADER_BYTES);
  await file.read(0, head);
  const header = parseHeader(head, fileSize, file.path);
  const bat = Buffer.alloc(4 * header.batEntries);
  await file.read(HEADER_BYTES, bat);
  const result: CheckResult & { fragmentedClusters: number } = { fragmentedClusters: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [], totalClusters: header.batEntries, allocatedClusters: 0 };
  if (header.inuse) {
    result.corruptions += 1;
    result.messages.push('ERROR image was not closed correctly');
  }
  let highest = 0;
  let previous = 0;
  for (let i = 0; i < header.batEntries; i++) {
    options.progress?.(i, header.batEntries);
    const entry = bat.readUInt32LE(4 * i);
    if (entry === 0) {
      previous = 0;
      continue;
    }
    const offset = entrySector(header, entry) * 512;
    if (offset > fileSize) {
      result.corruptions += 1;
      result.messages.push(`ERROR cluster ${i} is outside image`);
    }
    result.allocatedClusters! += 1;
    highest = Math.max(highest, offset);
    if (previous !== 0 && previous + header.clusterSize !== offset) result.fragmentedClusters += 1;
    previous = offset;
  }
  result.imageEndOffset = highest + header.clusterSize;
  if (fileSize > result.imageEndOffset) {
    result.leaks += Math.ceil((fileSize - result.imageEndOffset) / header.clusterSize);
    result.messages.push(`ERROR space leaked at the end of the image ${fileSize - result.imageEndOffset}`);
  }
  return result;
}
