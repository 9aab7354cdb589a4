/**
 * Opening a VHD: finding its footer (the copy at offset 0 of a dynamic or
 * differencing disk, or the footer at the end of a fixed one), the virtual
 * size (footer.ts: CHS geometry or current_size by creator application, as
 * qemu), and for dynamic and differencing disks the dynamic header, the BAT
 * (bounded and checked, bat.ts) and the parent's name. No state is kept
 * here; the opened image is image.ts.
 *
 * Concurrency: runs once per open, before the image is shared.
 */
import createDebug from 'debug';
import { CorruptImageError, InvalidArgumentError, UnsupportedFeatureError } from '../../block/errors.js';
import type { BackingReference, FormatImage, OpenOptions, Protocol } from '../../block/types.js';
import { checkBat, firstFreeOffset, metadataAreas, readBat } from './bat.js';
import {
  DYNAMIC_HEADER_BYTES, isPathLocator, locatorPath, parseDynamicHeader, platformName, PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU,
  type DynamicHeader,
} from './dynamic-header.js';
import { DISK_DIFFERENCING, DISK_FIXED, FOOTER_BYTES, FOOTER_COOKIE, parseFooter, virtualSizeOf, type SizeSource, type VhdFooter } from './footer.js';
import { VpcImage } from './image.js';

const log = createDebug('imgmount:vpc');

/** The open options vpc takes (qemu's names). */
export const OPEN_OPTIONS = ['force_size_calc'] as const;

/** qemu's force_size_calc=chs|current_size: the virtual size by hand instead of by creator application. */
function forcedSizeSource(options: OpenOptions): SizeSource | undefined {
  const value = options.formatOptions?.['force_size_calc'];
  if (value === undefined) return undefined;
  if (value === 'chs' || value === 'current_size') return value;
  throw new InvalidArgumentError(`force_size_calc '${value}' is not chs or current_size`);
}

/** Parent locators tried in this order: the relative path first, as Windows does. */
const LOCATOR_ORDER = [PLATFORM_W2RU, PLATFORM_MACX, PLATFORM_W2KU];

async function readAt(file: Protocol, offset: number, length: number): Promise<Buffer> {
  const bytes = Buffer.alloc(length);
  await file.read(offset, bytes);
  return bytes;
}

/** The footer and where it was found; the copy at offset 0 is used for dynamic and differencing disks, like qemu. */
export async function readFooter(file: Protocol, fileSize: number): Promise<{ footer: VhdFooter; bytes: Buffer }> {
  if (fileSize < FOOTER_BYTES) {
    throw new CorruptImageError(`${file.path}: the file is ${fileSize} bytes, too short for a ${FOOTER_BYTES}-byte VHD footer`);
  }
  const head = await readAt(file, 0, FOOTER_BYTES);
  if (head.subarray(0, 8).equals(FOOTER_COOKIE)) {
    const footer = parseFooter(head, file.path, 'offset 0');
    if (footer.diskType !== DISK_FIXED) return { footer, bytes: head };
    // A fixed disk whose first sector holds a footer: its own footer is the one at the end.
  }
  const tail = await readAt(file, fileSize - FOOTER_BYTES, FOOTER_BYTES);
  if (!tail.subarray(0, 8).equals(FOOTER_COOKIE)) {
    const short = await readAt(file, fileSize - (FOOTER_BYTES - 1), 8);
    if (short.equals(FOOTER_COOKIE)) {
      throw new UnsupportedFeatureError(`${file.path}: a 511-byte VHD footer (Virtual PC before 2004) is not supported`);
    }
    throw new CorruptImageError(`${file.path}: no VHD footer (cookie "conectix") at offset 0 or at the end of the file`);
  }
  const footer = parseFooter(tail, file.path, `the end of the file (offset ${fileSize - FOOTER_BYTES})`);
  if (footer.diskType !== DISK_FIXED) {
    throw new CorruptImageError(`${file.path}: the VHD footer at the end says ${footer.diskType === DISK_DIFFERENCING ? 'differencing' : 'dynamic'}, but the copy at offset 0 is missing or damaged`);
  }
  return { footer, bytes: tail };
}

export async function openVpc(file: Protocol, options: OpenOptions): Promise<FormatImage> {
  const fileSize = await file.size();
  const { footer, bytes } = await readFooter(file, fileSize);
  const { size, source } = virtualSizeOf(footer, file.path, forcedSizeSource(options));
  log('%s: %s VHD by %j, %d bytes from %s', file.path, footer.diskType, footer.creatorApp, size, source);
  if (footer.diskType === DISK_FIXED) {
    if (size > fileSize - FOOTER_BYTES) {
      throw new CorruptImageError(`${file.path}: fixed VHD of ${size} bytes (${source}) needs ${size + FOOTER_BYTES} bytes with its footer; the file has ${fileSize} (truncated image?)`);
    }
    return new VpcImage(file, footer, bytes, size, source, undefined, undefined);
  }
  const differencing = footer.diskType === DISK_DIFFERENCING;
  const headerOffset = footer.dataOffset!;
  const header = parseDynamicHeader(await readAt(file, headerOffset, DYNAMIC_HEADER_BYTES), headerOffset, fileSize, size, differencing, file.path);
  const bat = await readBat(file, header);
  const areas = metadataAreas(header, headerOffset, DYNAMIC_HEADER_BYTES, differencing);
  const blocksEnd = checkBat(bat, header, areas, fileSize, file.path);
  const tail = await readAt(file, fileSize - FOOTER_BYTES, FOOTER_BYTES);
  const allocationEnd = firstFreeOffset(areas, blocksEnd, fileSize, tail);
  let backing: BackingReference | undefined;
  if (differencing) {
    backing = { filename: await parentName(file, header), format: 'vpc' };
  }
  return new VpcImage(file, footer, bytes, size, source, { header, bat, allocationEnd }, backing);
}

/** The parent's file name: the first usable path locator (W2ru, MacX, W2ku), else parent_unicode_name. */
export async function parentName(file: Protocol, header: DynamicHeader): Promise<string> {
  for (const platform of LOCATOR_ORDER) {
    for (const locator of header.locators.filter((l) => l.platform === platform && isPathLocator(l.platform))) {
      if (locator.dataLength === 0) continue;
      const name = locatorPath(platform, await readAt(file, locator.dataOffset, locator.dataLength));
      if (name !== undefined && name.length > 0) {
        log('%s: parent %j from the %s locator', file.path, name, platformName(platform));
        return name;
      }
    }
  }
  if (header.parentName.length > 0) return header.parentName.replace(/\\/g, '/');
  throw new CorruptImageError(`${file.path}: differencing VHD names no parent: no W2ru, MacX or W2ku parent locator and an empty parent_unicode_name`);
}
