/**
 * Format detection over a list of drivers that the caller passes in (the
 * library and the CLI wire the default list from src/formats): the block
 * layer never imports the formats.
 *
 * Each driver scores a ProbeSample 0..100 (the file's first and last bytes,
 * its size and name); the highest wins, and raw answers 1. Formats we can
 * recognize but not read yet are ordinary drivers whose `open` refuses by
 * name, so such an image is never shown (or written) as raw.
 *
 * A file whose extension names a format (.qed, .qcow2) but whose content is
 * something else is refused unless the format is given explicitly: reading a
 * damaged image as raw would hand its metadata to the guest as data, and
 * writing would destroy it.
 */
import { extname } from 'node:path';
import { InvalidArgumentError } from './errors.js';
import type { FormatDriver, ProbeSample, Protocol } from './types.js';

/** Bytes read from the start of a file for probing. */
export const PROBE_HEAD_BYTES = 4096;
/** Bytes read from the end of a file for probing (VHD footer, DMG koly trailer). */
export const PROBE_TAIL_BYTES = 1024;

export class FormatList {
  constructor(readonly drivers: readonly FormatDriver[]) {}

  /** Picks the driver with the highest score for a sample (raw when nothing else matches). */
  probe(sample: ProbeSample): FormatDriver {
    const chosen = this.best(sample);
    const claimed = this.claimedByExtension(sample.filename);
    if (claimed !== undefined && claimed !== chosen.name) {
      throw new InvalidArgumentError(
        `${sample.filename}: the name says ${claimed} but the content is not a valid ${claimed} image` +
          ` (it probes as ${chosen.name}); pass -f ${chosen.name} to open it as ${chosen.name} anyway`,
      );
    }
    return chosen;
  }

  /** The best-scoring driver, ignoring the file name's extension. */
  best(sample: ProbeSample): FormatDriver {
    let best: FormatDriver | undefined;
    let bestScore = -1;
    for (const format of this.drivers) {
      const score = format.probe(sample);
      if (score > bestScore) {
        best = format;
        bestScore = score;
      }
    }
    if (!best) throw new InvalidArgumentError('no image formats are configured');
    return best;
  }

  /** The format a file name's extension stands for, when it names a real image format. */
  claimedByExtension(filename: string): string | undefined {
    const extension = extname(filename).toLowerCase();
    return this.drivers.find((format) => format.name !== 'raw' && format.extensions.includes(extension))?.name;
  }

  /** Looks up a format named by the user, with a message listing the choices. */
  named(name: string): FormatDriver {
    const format = this.drivers.find((driver) => driver.name === name);
    if (!format) throw new InvalidArgumentError(`unknown format '${name}' (known: ${this.names()})`);
    return format;
  }

  /** Names of every format, for help texts and messages. */
  names(): string {
    return this.drivers.map((format) => format.name).join(', ');
  }
}

/** Reads what probing looks at from a file. */
export async function sampleFile(file: Protocol): Promise<ProbeSample> {
  const fileSize = await file.size();
  const head = Buffer.alloc(PROBE_HEAD_BYTES);
  await file.read(0, head);
  const tailLength = Math.min(PROBE_TAIL_BYTES, fileSize);
  const tail = Buffer.alloc(tailLength);
  await file.read(fileSize - tailLength, tail);
  return { head, tail, fileSize, filename: file.path };
}
