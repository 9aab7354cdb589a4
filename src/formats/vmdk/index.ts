/**
 * The VMDK format driver (what is supported: docs/formats/vmdk.md): probe,
 * open (open.ts: sparse files, stream-optimized files, descriptor files with
 * flat and sparse extents, VMDK3 "COWD" (cowd.ts) and seSparse (sesparse.ts) ones; writable.ts writes monolithicSparse files
 * and descriptor files of flat and sparse extents,
 * stream-write.ts the compressed grains of streamOptimized files for convert),
 * check, create (create.ts: monolithicSparse, streamOptimized, monolithicFlat, twoGbMaxExtentFlat / Sparse).
 * Other forms opened read-write become read-only, with a notice saying why.
 */
import type { FormatDriver, ProbeSample } from '../../block/types.js';
import { checkVmdk } from './check.js';
import { createVmdk } from './create.js';
import { VMDK3_MAGIC, VMDK4_MAGIC } from './header.js';
import { openVmdk } from './open.js';

const DESCRIPTOR_BANNER = '# Disk DescriptorFile';

/**
 * qemu's test for a text descriptor: skipping comment lines and blank lines,
 * the first line is "version=N" (N 1..3), LF or CRLF. qemu accepts only blank
 * lines made of spaces; empty lines and tabs are accepted here too.
 */
function isDescriptor(head: Buffer): boolean {
  const text = head.toString('latin1');
  if (text.startsWith(DESCRIPTOR_BANNER)) return true;
  let start = 0;
  while (start < text.length) {
    const newline = text.indexOf('\n', start);
    if (newline === -1) return false; // a line the sample cuts off (or the zeros past a short file)
    const line = text.slice(start, newline);
    if (line.startsWith('#') || /^[ \t]*\r?$/.test(line)) {
      start = newline + 1;
      continue;
    }
    return /^version=[123]\r?$/.test(line);
  }
  return false;
}

export const vmdk: FormatDriver = {
  name: 'vmdk',
  extensions: ['.vmdk'],
  probe({ head }: ProbeSample): number {
    const magic = head.subarray(0, 4);
    return magic.equals(VMDK4_MAGIC) || magic.equals(VMDK3_MAGIC) || isDescriptor(head) ? 100 : 0;
  },
  open: openVmdk,
  check: checkVmdk,
  create: createVmdk,
};
