/**
 * The Parallels format driver, read-only: probe (either magic, version 2),
 * open (header and catalog checks in header.ts, the format extension with its
 * dirty bitmaps in extension.ts), the I/O answers in image.ts, check in
 * check.ts. No shared state: each open image is independent.
 */
import createDebug from 'debug';
import { CorruptImageError } from '../../block/errors.js';
import type { FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { checkParallels } from './check.js';
import { parseExtension } from './extension.js';
import { checkCatalog, HEADER_BYTES, HEADER_VERSION, MAGIC_V1, MAGIC_V2, parseHeader } from './header.js';
import { ParallelsImage } from './image.js';

const log = createDebug('imgmount:parallels');

async function openParallels(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const notice = options.notice ?? ((line: string) => log(line));
  const fileSize = await file.size();
  const head = Buffer.alloc(HEADER_BYTES);
  await file.read(0, head);
  const header = parseHeader(head, fileSize, file.path);
  // parseHeader bounded the catalog by the file size before this allocation.
  const bat = Buffer.alloc(4 * header.batEntries);
  await file.read(HEADER_BYTES, bat);
  checkCatalog(header, bat, fileSize, file.path);
  if (header.inuse) notice(`${file.path}: parallels image was not closed cleanly (inuse set); reading it as it is, as qemu does read-only`);
  if (header.extOff !== 0n) {
    const at = header.extOff * 512n;
    if (at + BigInt(header.clusterSize) > BigInt(fileSize)) {
      throw new CorruptImageError(`${file.path}: parallels ext_off ${header.extOff} (sectors) puts the ${header.clusterSize}-byte format extension past the end of the ${fileSize}-byte file`);
    }
    const cluster = Buffer.alloc(header.clusterSize);
    await file.read(Number(at), cluster);
    const bitmaps = parseExtension(cluster, header.totalSectors, header.clusterSize, file.path);
    log('%s: format extension with %d dirty bitmap(s) %o, checked and ignored', file.path, bitmaps.length, bitmaps);
  }
  return new ParallelsImage(file, header, bat);
}

export const parallels: FormatDriver = {
  name: 'parallels',
  extensions: ['.hdd', '.hds'],
  readOnlyReason: 'parallels images are read-only here',
  probe(sample: ProbeSample): number {
    const { head } = sample;
    if (head.length < HEADER_BYTES) return 0;
    const magic = head.subarray(0, 16);
    return (magic.equals(MAGIC_V1) || magic.equals(MAGIC_V2)) && head.readUInt32LE(16) === HEADER_VERSION ? 100 : 0;
  },
  open: openParallels,
  check: checkParallels,
};
