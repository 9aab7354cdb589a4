/**
 * The parent of a differencing VHDX (MS-VHDX 2.6.2.6): which file the parent
 * locator names (relative_path first, then absolute_win32_path, then
 * volume_path, Windows separators turned into '/'), and the check that the
 * file found is the parent this image was made over: its current header's
 * DataWriteGuid must equal parent_linkage (or parent_linkage2). The generic
 * layer opens the chain; this module only reads the parent's headers through
 * the file gate. Stateless.
 */
import { CorruptImageError } from '../../block/errors.js';
import type { BackingReference, FileGate } from '../../block/types.js';
import { chooseHeader, FILE_SIGNATURE, guidText, HEADER_BYTES, HEADER_OFFSETS } from './header.js';

/** The locator keys that name the parent, in the order they are tried. */
const PATH_KEYS = ['relative_path', 'absolute_win32_path', 'volume_path'] as const;

/** A name stored with Windows separators as a path here: `.\\base.vhdx` becomes `base.vhdx`. */
export function localName(stored: string): string {
  const slashed = stored.replace(/\\/g, '/');
  return slashed.startsWith('./') ? slashed.slice(2) : slashed;
}

export function parentReference(pairs: ReadonlyMap<string, string>, path: string): BackingReference {
  for (const key of PATH_KEYS) {
    const value = pairs.get(key);
    if (value !== undefined && value !== '') return { filename: localName(value), format: 'vhdx' };
  }
  throw new CorruptImageError(`${path}: the parent locator names no parent file (none of ${PATH_KEYS.join(', ')})`);
}

/** The GUID text of a locator value, without braces, lower case. */
function bare(value: string | undefined): string | undefined {
  return value?.replace(/[{}]/g, '').toLowerCase();
}

/**
 * Refuses a parent whose DataWriteGuid is not the image's parent_linkage: the
 * parent changed after the child was made, or the locator finds another file.
 * When the parent cannot be opened, the generic layer reports that when it opens it.
 */
export async function verifyParent(pairs: ReadonlyMap<string, string>, name: string, files: FileGate, path: string): Promise<void> {
  let parent;
  try {
    parent = await files.open(name, 'parent of a differencing VHDX', { readOnly: true });
  } catch {
    return;
  }
  const read = async (offset: number, length: number) => {
    const bytes = Buffer.alloc(length);
    await parent.read(offset, bytes);
    return bytes;
  };
  if (!(await read(0, 8)).equals(FILE_SIGNATURE)) {
    throw new CorruptImageError(`${path}: the parent ${name} is not a VHDX image (no "vhdxfile" identifier)`);
  }
  const header = chooseHeader(await read(HEADER_OFFSETS[0], HEADER_BYTES), await read(HEADER_OFFSETS[1], HEADER_BYTES), await parent.size(), parent.path);
  const actual = guidText(header.dataWriteGuid).toLowerCase();
  const linkage = bare(pairs.get('parent_linkage'));
  if (actual !== linkage && actual !== bare(pairs.get('parent_linkage2'))) {
    throw new CorruptImageError(
      `${path}: the parent ${name} has data write GUID {${actual}}, but this image was made over {${linkage}}: the parent was changed since, or it is another file`,
    );
  }
}
