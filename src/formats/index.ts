/**
 * The list of formats, written out in one place. Probing order does not
 * matter: the highest score wins. `recognizedButUnsupported` names formats we
 * can identify by magic but cannot open yet, so users get a clear refusal
 * instead of their image being read as raw.
 */
import type { FormatDriver } from '../block/types.js';
import { qed } from './qed/index.js';
import { raw } from './raw/index.js';

export const formats: readonly FormatDriver[] = [qed, raw];

export interface RecognizedFormat {
  name: string;
  magic: Buffer;
  extensions: readonly string[];
}

export const recognizedButUnsupported: readonly RecognizedFormat[] = [
  { name: 'qcow2', magic: Buffer.from([0x51, 0x46, 0x49, 0xfb]), extensions: ['.qcow2', '.qcow'] },
  { name: 'vmdk', magic: Buffer.from('KDMV', 'latin1'), extensions: ['.vmdk'] },
  { name: 'vdi', magic: Buffer.from('<<< ', 'latin1'), extensions: ['.vdi'] },
  { name: 'vhdx', magic: Buffer.from('vhdxfile', 'latin1'), extensions: ['.vhdx'] },
];

export function findFormat(name: string): FormatDriver | undefined {
  return formats.find((format) => format.name === name);
}
