/**
 * Creating a differencing VHD over a VHD parent (`create -f vpc -b PARENT`),
 * which qemu cannot do. The dynamic header names the parent as the
 * specification says and Windows-compatible writers do: parent_unique_id is
 * the parent footer's UUID, parent_timestamp the parent file's modification
 * time (VHD epoch), parent_unicode_name its file name (UTF-16BE), and three
 * parent locators: W2ku (absolute path, UTF-16LE, `\` separators), W2ru
 * (relative to the child's directory, `.\name` or `..\dir\name`), and MacX
 * (a UTF-8 `file://` URL of the absolute path: the specification's Mac
 * locator, the one a POSIX reader follows without guessing a drive letter).
 * Each locator's data gets whole sectors after the BAT; platform_data_space
 * is stored in bytes, as Windows does (the specification says sectors;
 * readers use data_length).
 *
 * Layout: footer copy at 0, dynamic header at 512, BAT at 1536, the locators'
 * data, the footer. Everything is read and validated before the file is
 * touched.
 *
 * Concurrency: the new file is ours alone; the parent is only read.
 */
import { stat } from 'node:fs/promises';
import { basename, dirname, relative, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { resolveBackingName } from '../../block/backing-name.js';
import { hostIoError, InvalidArgumentError } from '../../block/errors.js';
import { FileProtocol } from '../../block/file.js';
import { PARENT_NAME_BYTES } from './dynamic-header.js';
import { SECTOR, VHD_EPOCH, vhdChecksum, type VhdFooter } from './footer.js';
import { readFooter } from './open.js';

export interface ParentIdentity {
  uuid: Buffer;
  /** The parent file's modification time, seconds since 2000-01-01 UTC. */
  timestamp: number;
  /** parent_unicode_name: the parent's file name. */
  name: string;
  /** Locators in the order written: platform code and its data. */
  locators: Array<{ code: 'W2ku' | 'W2ru' | 'MacX'; data: Buffer }>;
}

/** Reads the parent's footer and builds what the child's header says about it. */
export async function parentIdentity(childPath: string, backingFile: string, backingFormat: string | undefined): Promise<ParentIdentity> {
  if (backingFormat !== undefined && backingFormat !== 'vpc') {
    throw new InvalidArgumentError(`vpc images cannot be created with a backing file of format ${backingFormat} (${backingFile}): a differencing VHD's parent must be a VHD (vpc)`);
  }
  const parentPath = resolve(resolveBackingName(childPath, backingFile));
  if (parentPath.includes('\\')) {
    throw new InvalidArgumentError(`parent path ${parentPath} contains a backslash, which a VHD parent locator (a Windows path) cannot hold`);
  }
  const file = await FileProtocol.open(parentPath, true);
  let footer: VhdFooter;
  try {
    ({ footer } = await readFooter(file, await file.size()));
  } finally {
    await file.close();
  }
  let mtime: number;
  try {
    mtime = Math.floor((await stat(parentPath)).mtimeMs / 1000);
  } catch (error) {
    throw hostIoError('cannot stat the parent', parentPath, error);
  }
  const name = basename(parentPath);
  if (Buffer.byteLength(name, 'utf16le') > PARENT_NAME_BYTES) {
    throw new InvalidArgumentError(`parent file name ${name} is longer than the ${PARENT_NAME_BYTES / 2} UTF-16 units parent_unicode_name holds`);
  }
  let rel = relative(dirname(resolve(childPath)), parentPath);
  if (!rel.startsWith('../')) rel = `./${rel}`;
  const windows = (text: string) => Buffer.from(text.replace(/\//g, '\\'), 'utf16le');
  return {
    uuid: Buffer.from(footer.uuid),
    timestamp: Math.max(0, mtime - VHD_EPOCH) >>> 0,
    name,
    locators: [
      { code: 'W2ku', data: windows(parentPath) },
      { code: 'W2ru', data: windows(rel) },
      { code: 'MacX', data: Buffer.from(pathToFileURL(parentPath).href, 'utf8') },
    ],
  };
}

/** Bytes the locators' data take after the BAT: whole sectors each. */
export function locatorsBytes(parent: ParentIdentity): number {
  return parent.locators.reduce((sum, l) => sum + Math.ceil(l.data.length / SECTOR) * SECTOR, 0);
}

/**
 * Fills the parent fields of `header` (a new dynamic header), placing the
 * locators' data at `dataStart` of `image` (the whole new file), and
 * recomputes the header checksum.
 */
export function writeParent(header: Buffer, image: Buffer, dataStart: number, parent: ParentIdentity): void {
  parent.uuid.copy(header, 40);
  header.writeUInt32BE(parent.timestamp, 56);
  header.fill(0, 64, 64 + PARENT_NAME_BYTES);
  Buffer.from(parent.name, 'utf16le').swap16().copy(header, 64);
  let at = dataStart;
  parent.locators.forEach((locator, i) => {
    const entry = 576 + i * 24;
    const space = Math.ceil(locator.data.length / SECTOR) * SECTOR;
    header.write(locator.code, entry, 4, 'latin1');
    header.writeUInt32BE(space, entry + 4);
    header.writeUInt32BE(locator.data.length, entry + 8);
    header.writeUInt32BE(0, entry + 12);
    header.writeBigUInt64BE(BigInt(at), entry + 16);
    image.fill(0, at, at + space);
    locator.data.copy(image, at);
    at += space;
  });
  header.writeUInt32BE(vhdChecksum(header, 36), 36);
}
