/**
 * `imgmount create -f FMT [-b BACKING [-F FMT]] [-o k=v,...] FILE [SIZE]`,
 * after qemu-img create. Prints a "Formatting ..." line like qemu-img.
 */
import { createImage } from '../index.js';
import { parseSize } from '../block/size.js';
import { InvalidArgumentError } from '../block/errors.js';
import { humanSize } from './format-bytes.js';

export interface CreateArguments {
  format: string;
  file: string;
  size?: string;
  backing?: string;
  backingFormat?: string;
  options?: string[];
  force?: boolean;
}

/** Parses `-o a=1,b=2` (repeatable) into a record. */
export function parseOptionList(lists: string[] | undefined): Record<string, string> {
  const options: Record<string, string> = {};
  for (const list of lists ?? []) {
    for (const item of list.split(',')) {
      if (item.trim() === '') continue;
      const equals = item.indexOf('=');
      if (equals <= 0) throw new InvalidArgumentError(`invalid option '${item}': expected name=value`);
      options[item.slice(0, equals).trim()] = item.slice(equals + 1).trim();
    }
  }
  return options;
}

export async function runCreate(args: CreateArguments): Promise<void> {
  const options = parseOptionList(args.options);
  let backingFile = args.backing;
  let backingFormat = args.backingFormat;
  if (options.backing_file !== undefined) {
    backingFile ??= options.backing_file;
    delete options.backing_file;
  }
  if (options.backing_fmt !== undefined) {
    backingFormat ??= options.backing_fmt;
    delete options.backing_fmt;
  }
  const size = args.size !== undefined ? parseSize(args.size) : undefined;
  await createImage(args.file, args.format, { size, backingFile, backingFormat, options, force: args.force });
  const details = [
    `fmt=${args.format}`,
    size !== undefined ? `size=${size}` : undefined,
    backingFile !== undefined ? `backing_file=${backingFile}` : undefined,
    backingFormat !== undefined ? `backing_fmt=${backingFormat}` : undefined,
    ...Object.entries(options).map(([key, value]) => `${key}=${value}`),
  ].filter(Boolean);
  process.stdout.write(`Formatting '${args.file}', ${details.join(' ')}${size !== undefined ? ` (${humanSize(size)})` : ''}\n`);
}
