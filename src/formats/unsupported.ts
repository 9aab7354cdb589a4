/**
 * Formats we recognize but cannot read yet. Each is an ordinary driver whose
 * probe finds its images and whose `open` refuses by name, so such an image
 * is never mounted as raw.
 */
import { UnsupportedFeatureError } from '../block/errors.js';
import type { FormatDriver, ProbeSample } from '../block/types.js';

function recognized(name: string, extensions: readonly string[], probe: (sample: ProbeSample) => number): FormatDriver {
  return {
    name,
    extensions,
    probe,
    async open(file) {
      throw new UnsupportedFeatureError(`${file.path}: ${name} images are not supported yet`);
    },
  };
}

function magicAt(offset: number, magic: string | Buffer): (sample: ProbeSample) => number {
  const bytes = typeof magic === 'string' ? Buffer.from(magic, 'latin1') : magic;
  return (sample) => (sample.head.subarray(offset, offset + bytes.length).equals(bytes) ? 100 : 0);
}

export const unsupportedFormats: readonly FormatDriver[] = [
  recognized('vmdk', ['.vmdk'], magicAt(0, 'KDMV')),
  recognized('vdi', ['.vdi'], magicAt(0x40, Buffer.from([0x7f, 0x10, 0xda, 0xbe]))),
  recognized('vhdx', ['.vhdx', '.avhdx'], magicAt(0, 'vhdxfile')),
];
