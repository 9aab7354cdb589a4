/**
 * The VDI format driver (VirtualBox Disk Image 1.1, dynamic and static; 1 MiB
 * blocks read-write, other power-of-two block sizes read-only;
 * docs/formats/vdi.md): probe, open, create and check. The header
 * rules live in header.ts, the block map in bmap.ts, the I/O path in image.ts.
 * No shared state between opened images.
 */
import createDebug from 'debug';
import type { CheckOptions, CheckResult, CreateOptions, FormatDriver, FormatImage, OpenOptions, ProbeSample, Protocol } from '../../block/types.js';
import { BlockMap } from './bmap.js';
import { checkVdi } from './check.js';
import { createVdi } from './create.js';
import { DEFAULT_BLOCK_SIZE, HEADER_BYTES, parseHeader, SIGNATURE_OFFSET, VDI_SIGNATURE, type VdiHeader } from './header.js';
import { VdiImage } from './image.js';

const log = createDebug('imgmount:vdi');

/** A damaged signature under the VirtualBox banner: a header at the start of the file (another format's) beats it. */
const LIKELY = 90;

async function readHeader(file: Protocol): Promise<{ header: VdiHeader; fileSize: number }> {
  const bytes = Buffer.alloc(HEADER_BYTES);
  await file.read(0, bytes);
  const fileSize = await file.size();
  return { header: parseHeader(bytes, fileSize, file.path), fileSize };
}

async function openVdi(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const { header, fileSize } = await readHeader(file);
  const bmap = await BlockMap.load(file, header);
  const image = new VdiImage(file, header, bmap, fileSize);
  if (header.blockSize === DEFAULT_BLOCK_SIZE) return image;
  if (!file.readOnly) {
    (options.notice ?? ((line: string) => log(line)))(
      `${file.path}: opened read-only: VDI block_size ${header.blockSize} is not ${DEFAULT_BLOCK_SIZE}; qemu refuses such images, so writes to them could not be checked against it`,
    );
  }
  return readOnlyView(image);
}

/** The image without write, zero and discard: the generic layer then keeps it read-only. */
function readOnlyView(image: VdiImage): FormatImage {
  return {
    virtualSize: image.virtualSize,
    backing: undefined,
    map: (offset, length) => image.map(offset, length),
    flush: () => image.flush(),
    close: () => image.close(),
    info: () => image.info(),
  };
}

async function check(file: Protocol, options: CheckOptions): Promise<CheckResult> {
  const { header, fileSize } = await readHeader(file);
  return checkVdi(file, header, await BlockMap.load(file, header), fileSize, options);
}

export const vdi: FormatDriver = {
  name: 'vdi',
  extensions: ['.vdi'],
  /** The signature at 0x40 (qemu's probe); or the "<<< ... Disk Image >>>\n" banner with a damaged signature, so such an image is refused as VDI, never read as raw. */
  probe({ head }: ProbeSample): number {
    if (head.length >= SIGNATURE_OFFSET + 4 && head.readUInt32LE(SIGNATURE_OFFSET) === VDI_SIGNATURE) return 100;
    const banner = head.subarray(0, SIGNATURE_OFFSET).toString('latin1');
    return banner.startsWith('<<< ') && banner.includes(' Disk Image >>>\n') ? LIKELY : 0;
  },
  open: openVdi,
  create: (path: string, options: CreateOptions) => createVdi(path, options),
  check,
};
