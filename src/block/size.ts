/**
 * Parsing of user-given sizes ("64K", "10G", "512") the way qemu-img reads
 * them: a number with an optional K/M/G/T/P/E suffix (powers of 1024, case
 * insensitive, an optional trailing B), plain numbers are bytes.
 */
import { InvalidArgumentError } from './errors.js';

const MULTIPLIERS: Record<string, number> = {
  '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, p: 1024 ** 5, e: 1024 ** 6,
};

/** Parses "10G" into bytes; throws InvalidArgumentError naming `what` on bad input. */
export function parseSize(text: string, what = 'size'): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpeb]?)(?:i?b)?\s*$/i.exec(text);
  if (!match) {
    throw new InvalidArgumentError(`invalid ${what} '${text}': expected a number with an optional K, M, G or T suffix`);
  }
  const value = Number(match[1]) * MULTIPLIERS[match[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new InvalidArgumentError(`invalid ${what} '${text}': not a whole number of bytes below 2^53`);
  }
  return value;
}
