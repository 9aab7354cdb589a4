/**
 * VHD test helpers written from Microsoft's "Virtual Hard Disk Image Format
 * Specification" (not from src/formats/vpc): the checksum, patching a footer
 * field of an image qemu made (both copies, checksum fixed), and a writer of
 * dynamic and differencing VHDs (footer, dynamic header with the parent's
 * UUID, timestamp and UTF-16BE name, parent locators W2ku / W2ru (UTF-16LE
 * paths) and MacX (a UTF-8 file URL), the BAT and sector bitmaps), which
 * qemu 7.2 cannot make. Its images are cross-checked with vhdiinfo.
 */
import { randomUUID } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';

export const SECTOR = 512;
const VHD_EPOCH = 946684800;

/** One's complement of the byte sum, the checksum field's four bytes left out. */
export function specChecksum(bytes: Buffer, at: number): number {
  let sum = 0;
  bytes.forEach((byte, i) => {
    if (i < at || i >= at + 4) sum = (sum + byte) >>> 0;
  });
  return ~sum >>> 0;
}

export interface FooterFields {
  type: 2 | 3 | 4;
  size: number;
  /** cylinders, heads, sectors per track. */
  chs: [number, number, number];
  creatorApp?: string;
  dataOffset?: bigint;
  uuid?: Buffer;
  timestamp?: number;
}

export function footerBytes(fields: FooterFields): Buffer {
  const b = Buffer.alloc(512);
  b.write('conectix', 0, 'latin1');
  b.writeUInt32BE(2, 8);
  b.writeUInt32BE(0x00010000, 12);
  b.writeBigUInt64BE(fields.dataOffset ?? (fields.type === 2 ? 0xffffffffffffffffn : 512n), 16);
  b.writeUInt32BE(fields.timestamp ?? 0x2a000000, 24);
  b.write(fields.creatorApp ?? 'test', 28, 4, 'latin1');
  b.writeUInt32BE(0x00010000, 32);
  b.write('Wi2k', 36, 'latin1');
  b.writeBigUInt64BE(BigInt(fields.size), 40);
  b.writeBigUInt64BE(BigInt(fields.size), 48);
  b.writeUInt16BE(fields.chs[0], 56);
  b.writeUInt8(fields.chs[1], 58);
  b.writeUInt8(fields.chs[2], 59);
  b.writeUInt32BE(fields.type, 60);
  (fields.uuid ?? Buffer.from(randomUUID().replace(/-/g, ''), 'hex')).copy(b, 68);
  b.writeUInt32BE(specChecksum(b, 64), 64);
  return b;
}

/** Changes footer bytes at `at` in both copies (offset 0 when it holds one, and the end) and fixes their checksums. */
export async function patchFooter(path: string, at: number, bytes: Buffer): Promise<void> {
  const image = await readFile(path);
  const copies = [image.length - 512];
  if (image.subarray(0, 8).toString('latin1') === 'conectix') copies.push(0);
  for (const start of copies) {
    bytes.copy(image, start + at);
    image.writeUInt32BE(specChecksum(image.subarray(start, start + 512), 64), start + 64);
  }
  await writeFile(path, image);
}

/** The footer UUID (offset 68) and timestamp of a VHD file. */
export async function footerIdentity(path: string): Promise<{ uuid: Buffer; timestamp: number }> {
  const image = await readFile(path);
  const footer = image.subarray(image.length - 512);
  return { uuid: Buffer.from(footer.subarray(68, 84)), timestamp: footer.readUInt32BE(24) };
}

export interface ParentInfo {
  uuid: Buffer;
  timestamp: number;
  /** parent_unicode_name (UTF-16BE). */
  name: string;
  /** Path locators to write, in this order: platform code and its text. */
  locators: Array<{ code: 'W2ku' | 'W2ru' | 'MacX'; text: string }>;
}

export interface SparseImagePlan {
  size: number;
  blockSize: number;
  chs: [number, number, number];
  /** Sector-granular content: for each written sector (index), its 512 bytes. */
  sectors: Map<number, Buffer>;
  parent?: ParentInfo;
  creatorApp?: string;
}

/**
 * Writes a dynamic (no parent) or differencing VHD: footer copy, dynamic
 * header at 512, the locators' data after it, the BAT, then one block per
 * block holding a written sector (bitmap bits set for written sectors only),
 * then the footer.
 */
export async function writeSparseVhd(path: string, plan: SparseImagePlan): Promise<void> {
  const { blockSize } = plan;
  const sectorsPerBlock = blockSize / SECTOR;
  const bitmapBytes = Math.ceil(sectorsPerBlock / 8 / SECTOR) * SECTOR;
  const entries = Math.ceil(plan.size / blockSize);
  const locatorData = (plan.parent?.locators ?? []).map((l) => ({
    code: l.code,
    data: l.code === 'MacX' ? Buffer.from(l.text, 'utf8') : Buffer.from(l.text, 'utf16le'),
  }));
  let offset = 1536;
  const placed = locatorData.map((l) => {
    const space = Math.ceil(l.data.length / SECTOR) * SECTOR || SECTOR;
    const at = offset;
    offset += space;
    return { ...l, at, space };
  });
  const tableOffset = offset;
  const tableBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR;
  offset += tableBytes;
  const bat = Buffer.alloc(tableBytes, 0xff);
  const blocks = new Map<number, number[]>();
  for (const sector of [...plan.sectors.keys()].sort((a, b) => a - b)) {
    const index = Math.floor(sector / sectorsPerBlock);
    blocks.set(index, [...(blocks.get(index) ?? []), sector]);
  }
  const handle = await open(path, 'w');
  try {
    for (const [index, sectors] of blocks) {
      bat.writeUInt32BE(offset / SECTOR, index * 4);
      const bitmap = Buffer.alloc(bitmapBytes);
      for (const sector of sectors) {
        const bit = sector - index * sectorsPerBlock;
        bitmap[bit >> 3]! |= 0x80 >> (bit & 7);
        await handle.write(plan.sectors.get(sector)!, 0, SECTOR, offset + bitmapBytes + bit * SECTOR);
      }
      await handle.write(bitmap, 0, bitmapBytes, offset);
      offset += bitmapBytes + blockSize;
    }
    const type = plan.parent ? 4 : 3;
    const footer = footerBytes({ type, size: plan.size, chs: plan.chs, creatorApp: plan.creatorApp });
    const header = Buffer.alloc(1024);
    header.write('cxsparse', 0, 'latin1');
    header.writeBigUInt64BE(0xffffffffffffffffn, 8);
    header.writeBigUInt64BE(BigInt(tableOffset), 16);
    header.writeUInt32BE(0x00010000, 24);
    header.writeUInt32BE(entries, 28);
    header.writeUInt32BE(blockSize, 32);
    if (plan.parent) {
      plan.parent.uuid.copy(header, 40);
      header.writeUInt32BE(plan.parent.timestamp, 56);
      Buffer.from(plan.parent.name, 'utf16le').swap16().copy(header, 64, 0, 512);
      placed.forEach((l, i) => {
        const at = 576 + i * 24;
        header.write(l.code, at, 4, 'latin1');
        header.writeUInt32BE(l.space / SECTOR, at + 4);
        header.writeUInt32BE(l.data.length, at + 8);
        header.writeBigUInt64BE(BigInt(l.at), at + 16);
      });
    }
    header.writeUInt32BE(specChecksum(header, 36), 36);
    await handle.write(footer, 0, 512, 0);
    await handle.write(header, 0, 1024, 512);
    for (const l of placed) await handle.write(l.data, 0, l.data.length, l.at);
    await handle.write(bat, 0, tableBytes, tableOffset);
    await handle.write(footer, 0, 512, offset);
  } finally {
    await handle.close();
  }
}

/** The VHD timestamp of now. */
export function vhdNow(): number {
  return Math.floor(Date.now() / 1000) - VHD_EPOCH;
}
