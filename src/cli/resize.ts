/**
 * `imgmount resize [--shrink] [-f FMT] FILE [+|-]SIZE`, after qemu-img
 * resize: SIZE is the new size, +SIZE grows by it and -SIZE shrinks by it
 * (the parser takes it from the end of the line before the options, so
 * `-1G` is a size, not an option). A shrink needs --shrink. On success it
 * prints qemu-img's "Image resized."; a failure is one line and exit 1.
 */
import { resizeImage, type ResizeTarget } from '../index.js';
import { parseSize } from '../block/size.js';

export interface ResizeArguments {
  file: string;
  size: string;
  format?: string;
  shrink: boolean;
}

/** "1G" -> 1 GiB; "+1G" / "-1G" -> a change of the current size. */
export function parseResizeTarget(text: string): ResizeTarget {
  const sign = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  if (sign === 0) return parseSize(text);
  return { delta: sign * parseSize(text.slice(1)) };
}

export async function runResize(args: ResizeArguments): Promise<void> {
  const target = parseResizeTarget(args.size);
  await resizeImage(args.file, target, {
    format: args.format,
    shrink: args.shrink,
    notice: (line) => process.stderr.write(`imgmount: ${line}\n`),
  });
  process.stdout.write('Image resized.\n');
}
