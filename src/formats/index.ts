/**
 * The list of formats, written out in one place and passed to the block
 * layer by the library and the CLI (src/index.ts). Probing order does not
 * matter: the highest score wins. Formats we can identify but not read yet
 * are ordinary entries (unsupported.ts) whose `open` refuses by name, so a
 * user's image is never shown, or written, as raw.
 */
import { FormatList } from '../block/probe.js';
import type { FormatDriver } from '../block/types.js';
import { bochs } from './bochs/index.js';
import { cloop } from './cloop/index.js';
import { dmg } from './dmg/index.js';
import { parallels } from './parallels/index.js';
import { qcow } from './qcow1/index.js';
import { qcow2 } from './qcow2/index.js';
import { qed } from './qed/index.js';
import { raw } from './raw/index.js';
import { unsupportedFormats } from './unsupported.js';
import { vdi } from './vdi/index.js';
import { vhdx } from './vhdx/index.js';
import { vmdk } from './vmdk/index.js';
import { vpc } from './vpc/index.js';

export const formatDrivers: readonly FormatDriver[] = [qcow2, qed, raw, vdi, vhdx, vmdk, vpc, qcow, parallels, bochs, cloop, dmg, ...unsupportedFormats];

/** The default list of formats of the library and the command line. */
export const defaultFormats = new FormatList(formatDrivers);
