/**
 * The qcow (version 1) format driver, read-only: probe ("QFI\xfb", version 1),
 * open (header checks in header.ts, the L1 table read whole, the backing file
 * name), and the I/O answers in image.ts. qemu-img has no check for qcow, and
 * neither does this driver. No shared state: each open image is independent.
 */
import { CorruptImageError } from '../../block/errors.js';
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { HEADER_BYTES, parseHeader, QCOW_MAGIC, QCOW_VERSION } from './header.js';
import { QcowImage } from './image.js';

async function openQcow(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  const bytes = Buffer.alloc(HEADER_BYTES);
  await file.read(0, bytes);
  const header = parseHeader(bytes, fileSize, file.path);
  // parseHeader bounded the L1 table by the file size (and qemu's INT_MAX / 8 entries) before this allocation.
  const l1 = Buffer.alloc(header.l1Size * 8);
  await file.read(header.l1TableOffset, l1);
  let backing: { filename: string } | undefined;
  if (header.backingFileOffset !== 0 && header.backingFileSize > 0) {
    const name = Buffer.alloc(header.backingFileSize);
    await file.read(header.backingFileOffset, name);
    const filename = name.toString('utf8');
    if (filename.includes('\0')) throw new CorruptImageError(`${file.path}: qcow backing file name holds a NUL byte`);
    backing = { filename };
  }
  return new QcowImage(file, header, l1, fileSize, backing, options);
}

export const qcow: FormatDriver = {
  name: 'qcow',
  extensions: ['.qcow'],
  readOnlyReason: 'qcow (version 1) images are read-only here',
  probe(sample: ProbeSample): number {
    const { head } = sample;
    return head.length >= 8 && head.subarray(0, 4).equals(QCOW_MAGIC) && head.readUInt32BE(4) === QCOW_VERSION ? 100 : 0;
  },
  open: openQcow,
};
