/**
 * `--open-option KEY=VALUE` (repeatable): options of the top image's format for
 * opening it, as qemu's runtime options (`-o force_size_calc=chs` of vpc), passed
 * to the library as `formatOptions`; the generic layer refuses a key the format
 * does not take, by name. Pure parsing, no I/O.
 */
import { InvalidArgumentError } from '../block/errors.js';

/** The KEY=VALUE list as a record; undefined for none. */
export function parseOpenOptions(list: readonly string[] | undefined): Record<string, string> | undefined {
  if (list === undefined || list.length === 0) return undefined;
  const options: Record<string, string> = {};
  for (const item of list) {
    const at = item.indexOf('=');
    const key = at < 0 ? item : item.slice(0, at);
    if (at <= 0 || !/^[a-z][a-z0-9_.-]*$/.test(key)) {
      throw new InvalidArgumentError(`--open-option ${item}: give KEY=VALUE (for example force_size_calc=chs)`);
    }
    if (key in options) throw new InvalidArgumentError(`--open-option ${key} is given twice`);
    options[key] = item.slice(at + 1);
  }
  return options;
}
