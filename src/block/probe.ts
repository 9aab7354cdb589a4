/**
 * Format detection. Each driver scores the first bytes of a file 0..100; the
 * highest wins (raw answers 1). A file whose extension names a format
 * (.qed, .qcow2) but whose content is something else is refused unless the
 * format is given explicitly: reading a damaged QED image as raw would hand
 * its metadata to the guest as data, and writing would destroy it.
 */
import { extname } from 'node:path';
import { InvalidArgumentError, UnsupportedFeatureError } from './errors.js';
import type { FormatDriver } from './types.js';
import { findFormat, formats, recognizedButUnsupported } from '../formats/index.js';

/** Bytes read from the start of a file for probing. */
export const PROBE_BYTES = 4096;

/** Picks the driver for a file from its first bytes and name. */
export function probeFormat(firstBytes: Buffer, filename: string): FormatDriver {
  for (const known of recognizedButUnsupported) {
    if (firstBytes.subarray(0, known.magic.length).equals(known.magic)) {
      throw new UnsupportedFeatureError(`${filename}: ${known.name} images are not supported yet (supported: ${formatNames()})`);
    }
  }
  let best: FormatDriver | undefined;
  let bestScore = -1;
  for (const format of formats) {
    const score = format.probe(firstBytes, filename);
    if (score > bestScore) {
      best = format;
      bestScore = score;
    }
  }
  const chosen = best!;
  const claimed = formatClaimedByExtension(filename);
  if (claimed !== undefined && claimed !== chosen.name) {
    throw new InvalidArgumentError(
      `${filename}: the name says ${claimed} but the content is not a valid ${claimed} image` +
        ` (it probes as ${chosen.name}); pass -f ${chosen.name} to open it as ${chosen.name} anyway`,
    );
  }
  return chosen;
}

/** The format a file name's extension stands for, when it names a real image format. */
export function formatClaimedByExtension(filename: string): string | undefined {
  const extension = extname(filename).toLowerCase();
  for (const format of formats) {
    if (format.name !== 'raw' && format.extensions.includes(extension)) return format.name;
  }
  for (const known of recognizedButUnsupported) {
    if (known.extensions.includes(extension)) return known.name;
  }
  return undefined;
}

/** Looks up a format named by the user, with a message listing the choices. */
export function namedFormat(name: string): FormatDriver {
  const format = findFormat(name);
  if (!format) throw new InvalidArgumentError(`unknown format '${name}' (supported: ${formatNames()})`);
  return format;
}

export function formatNames(): string {
  return formats.map((format) => format.name).join(', ');
}
