/**
 * Helpers shared by format `create` functions for the `-o key=value` options.
 */
import { InvalidArgumentError } from '../block/errors.js';

/** Refuses option names the format does not know, naming them and the known ones. */
export function rejectUnknownOptions(
  format: string,
  options: Record<string, string> | undefined,
  known: readonly string[],
): void {
  const unknown = Object.keys(options ?? {}).filter((name) => !known.includes(name));
  if (unknown.length > 0) {
    const allowed = known.length > 0 ? `; ${format} accepts ${known.join(', ')}` : `; ${format} takes no options`;
    throw new InvalidArgumentError(`unknown ${format} option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}${allowed}`);
  }
}
