/**
 * The VMDK text descriptor: the one embedded in a sparse file (sector 1 of a
 * monolithicSparse / streamOptimized image) or a whole descriptor file
 * (monolithicFlat, twoGbMax..., vmfs). What is read, and how, follows qemu's
 * block/vmdk.c so both sides agree on every image:
 *
 * - CID / parentCID: the first "CID" in the text, then a hex number after
 *   "CID="; both must be there (qemu refuses the image otherwise).
 * - parentFileNameHint="name": the parent of a differencing image.
 * - createType="...": descriptor files only.
 * - extent lines `RW <sectors> <TYPE> "<file>" [<offset>]`: lines that do not
 *   parse as one are skipped, as are lines whose access is not RW (qemu skips
 *   RDONLY and NOACCESS extents), whose size is not positive or whose type is
 *   unknown; a FLAT line without an offset, or another with one, is refused.
 *
 * Pure functions over the text; the text ends at its first NUL, as in qemu.
 */
import { CorruptImageError, InvalidArgumentError, UnsupportedFeatureError } from '../../block/errors.js';
import { SECTOR } from './header.js';

/** Bytes of descriptor qemu reads from a sparse file (20 sectors). */
export const EMBEDDED_DESCRIPTOR_BYTES = 20 * SECTOR;
/** Bytes of a descriptor file read at most (qemu: 1 MiB - 1). */
export const DESCRIPTOR_FILE_MAX_BYTES = (1 << 20) - 1;
/** Extents one descriptor may list: each is a file kept open. */
export const MAX_EXTENTS = 1024;
/** qemu's limit on a backing file name (PATH_MAX - 1). */
const MAX_HINT_LENGTH = 4095;

export type ExtentType = 'FLAT' | 'SPARSE' | 'VMFS' | 'VMFSSPARSE' | 'SESPARSE';
const EXTENT_TYPES: readonly string[] = ['FLAT', 'SPARSE', 'VMFS', 'VMFSSPARSE', 'SESPARSE'];

export interface ExtentLine {
  sectors: number;
  type: ExtentType;
  fileName: string;
  /** Start of the data in a FLAT extent file, in sectors (0 for VMFS). */
  flatOffset: number;
}

export interface Descriptor {
  cid: number;
  parentCid: number;
  parentFileNameHint?: string;
  createType?: string;
  extents: ExtentLine[];
}

/** The descriptor text in `bytes`: up to the first NUL, as UTF-8 (VMware writes file names so). */
export function descriptorText(bytes: Buffer): string {
  const nul = bytes.indexOf(0);
  return bytes.subarray(0, nul === -1 ? bytes.length : nul).toString('utf8');
}

function hexAfter(text: string, key: string, path: string): number {
  const at = text.indexOf(key);
  if (at === -1) throw new CorruptImageError(`${path}: the VMDK descriptor has no ${key} line`);
  const match = /^[ \t\r\n]*(?:0[xX])?([0-9a-fA-F]+)/.exec(text.slice(at + key.length + 1));
  if (!match) throw new CorruptImageError(`${path}: the VMDK descriptor's ${key} is not a hexadecimal number`);
  const value = Number.parseInt(match[1]!, 16);
  if (match[1]!.length > 8 && value > 0xffffffff) throw new CorruptImageError(`${path}: the VMDK descriptor's ${key} ${match[1]} is more than 32 bits`);
  return value;
}

/** A quoted value: after `key="`, up to the next double quote. */
function quoted(text: string, key: string, path: string, limit: number): string | undefined {
  const at = text.indexOf(key);
  if (at === -1) return undefined;
  const start = at + key.length + 2;
  const end = text.indexOf('"', start);
  if (start > text.length || end === -1) throw new CorruptImageError(`${path}: the VMDK descriptor's ${key} has no closing quote`);
  const value = text.slice(start, end);
  if (value.length > limit) throw new CorruptImageError(`${path}: the VMDK descriptor's ${key} is ${value.length} characters long (at most ${limit})`);
  return value;
}

const EXTENT_LINE = /^[ \t]*(\S{1,10})[ \t]+([+-]?\d+)[ \t]+(\S{1,10})[ \t]+"([^\n\r"]{1,511})"(?:[ \t]+([+-]?\d+))?/;

function parseExtents(text: string, path: string): ExtentLine[] {
  const extents: ExtentLine[] = [];
  for (const line of text.split('\n')) {
    const match = EXTENT_LINE.exec(line);
    if (!match || match[1] !== 'RW') continue;
    const [, , sectorText, type, fileName, offsetText] = match as unknown as [string, string, string, string, string, string | undefined];
    const invalid = () => new CorruptImageError(`${path}: invalid VMDK extent line: ${line.replace(/\r$/, '')}`);
    if (type === 'FLAT') {
      if (offsetText === undefined || Number(offsetText) < 0) throw invalid();
    } else if (offsetText !== undefined) {
      throw invalid();
    }
    const sectors = Number(sectorText);
    if (!(sectors > 0) || !EXTENT_TYPES.includes(type)) continue;
    const limit = Math.floor(Number.MAX_SAFE_INTEGER / SECTOR);
    const flatOffset = offsetText === undefined ? 0 : Number(offsetText);
    if (sectors > limit || flatOffset > limit) {
      throw new CorruptImageError(`${path}: VMDK extent line ${line.replace(/\r$/, '')}: sizes and offsets must be at most ${limit} sectors`);
    }
    extents.push({ sectors, type: type as ExtentType, fileName, flatOffset });
    if (extents.length > MAX_EXTENTS) throw new InvalidArgumentError(`${path}: the VMDK descriptor lists more than ${MAX_EXTENTS} extents`);
  }
  return extents;
}

/** The descriptor embedded in a sparse file: CIDs and the parent's name (its extent lines are not used, as in qemu). */
export function parseEmbeddedDescriptor(text: string, path: string): Descriptor {
  return {
    cid: hexAfter(text, 'CID', path),
    parentCid: hexAfter(text, 'parentCID', path),
    parentFileNameHint: quoted(text, 'parentFileNameHint', path, MAX_HINT_LENGTH),
    extents: [],
  };
}

/** The createTypes a descriptor file may have (qemu's list). */
export const DESCRIPTOR_FILE_TYPES: readonly string[] = ['monolithicFlat', 'vmfs', 'vmfsSparse', 'seSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'];

/** A descriptor file: its createType must be one qemu opens, and its extents are listed. */
export function parseDescriptorFile(text: string, path: string): Descriptor {
  const createType = quoted(text, 'createType', path, 127);
  if (createType === undefined) throw new CorruptImageError(`${path}: invalid VMDK descriptor: it has no createType`);
  if (!DESCRIPTOR_FILE_TYPES.includes(createType)) {
    throw new UnsupportedFeatureError(`${path}: VMDK descriptor createType "${createType}" cannot be a descriptor file (one of ${DESCRIPTOR_FILE_TYPES.join(', ')})`);
  }
  const extents = parseExtents(text, path);
  return { ...parseEmbeddedDescriptor(text, path), createType, extents };
}
