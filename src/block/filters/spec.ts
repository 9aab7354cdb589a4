/**
 * The command line's form of a filter, `NAME[:key=value,...]`, turned into a
 * FilterSpec. Kept apart from the filters themselves so that parsing a
 * command line loads none of them (a background mount starts from it).
 */
import { resolve } from 'node:path';
import { InvalidArgumentError } from '../errors.js';
import type { FilterSpec } from './types.js';

/** Option keys that name files: resolved against the caller's directory when the command line is parsed. */
export const FILE_OPTION_KEYS: readonly string[] = ['config', 'reference', 'log'];

/**
 * Parses `NAME[:key=value,...]` as given to --filter; `,,` is a literal comma
 * in a value, as in QEMU's option syntax. Paths in file options resolve
 * against `cwd`.
 */
export function parseFilterArgument(text: string, cwd: string = process.cwd()): FilterSpec {
  const colon = text.indexOf(':');
  const name = colon < 0 ? text : text.slice(0, colon);
  if (!/^[a-z][a-z0-9-]*$/.test(name)) throw new InvalidArgumentError(`--filter ${text}: expected NAME[:key=value,...]`);
  const spec: FilterSpec = { name };
  if (colon < 0) return spec;
  for (const item of splitOptions(text.slice(colon + 1))) {
    const equals = item.indexOf('=');
    if (equals <= 0) throw new InvalidArgumentError(`--filter ${text}: '${item}' is not key=value`);
    const key = item.slice(0, equals);
    const value = item.slice(equals + 1);
    if (key in spec) throw new InvalidArgumentError(`--filter ${text}: ${key} is given twice`);
    spec[key] = FILE_OPTION_KEYS.includes(key) && value !== '' ? resolve(cwd, value) : value;
  }
  return spec;
}

function splitOptions(text: string): string[] {
  const items: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i += 1) {
    if (text[i] === ',' && text[i + 1] === ',') {
      current += ',';
      i += 1;
    } else if (text[i] === ',') {
      items.push(current);
      current = '';
    } else current += text[i];
  }
  items.push(current);
  return items;
}

