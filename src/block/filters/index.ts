/**
 * The filters and the one place that stacks them. A filter sits between the
 * layers of the block stack (seed 003's listeners): protocol filters wrap a
 * layer's image file below its format (blkdebug, log-writes), image filters
 * watch a layer's opened image above its format (blkverify). Formats never
 * know; they only announce events (events.ts), which cost nothing without a
 * filter.
 *
 * Specs are validated before any file opens, so a bad option is one message
 * and the image is untouched. Filters of one layer apply in the order given:
 * the first given sits nearest the file.
 */
import { InvalidArgumentError } from '../errors.js';
import type { Protocol } from '../types.js';
import { blkdebug } from './blkdebug.js';
import { blkverify } from './blkverify.js';
import { delay } from './delay.js';
import { logWrites } from './log-writes.js';
import type { FilterContext, FilterDefinition, FilterOptions, FilterSpec, ImageFilter } from './types.js';

export type { FilterSpec, ImageFilter, FilterDefinition } from './types.js';
export { parseFilterArgument } from './spec.js';

export const FILTERS: readonly FilterDefinition[] = [blkdebug, blkverify, delay, logWrites];

/** A spec checked and split: the definition, its layer, its options as strings. */
export interface ResolvedFilter {
  definition: FilterDefinition;
  layer: number;
  options: FilterOptions;
}

/** Checks specs (names, keys, values) without opening anything. */
export function resolveFilters(specs: readonly FilterSpec[] | undefined): ResolvedFilter[] {
  return (specs ?? []).map((spec) => {
    const definition = FILTERS.find((filter) => filter.name === spec.name);
    if (!definition) {
      throw new InvalidArgumentError(`unknown filter '${spec.name}' (known: ${FILTERS.map((filter) => filter.name).join(', ')})`);
    }
    const options: Record<string, string> = {};
    let layer = 0;
    for (const [key, value] of Object.entries(spec)) {
      if (key === 'name' || value === undefined) continue;
      const text = String(value);
      if (key === 'layer') {
        if (!/^[0-9]+$/.test(text)) throw new InvalidArgumentError(`filter ${spec.name}: layer=${text} must be 0 (the top image) or more`);
        layer = Number(text);
        continue;
      }
      if (!definition.keys.includes(key)) {
        throw new InvalidArgumentError(`filter ${spec.name}: unknown key '${key}' (${[...definition.keys, 'layer'].join(', ')})`);
      }
      options[key] = text;
    }
    definition.validate(options);
    return { definition, layer, options };
  });
}

/** Wraps a layer's image file in that layer's protocol filters, first given nearest the file. */
export async function wrapProtocol(file: Protocol, filters: readonly ResolvedFilter[], context: FilterContext): Promise<Protocol> {
  let top = file;
  for (const filter of filters) {
    if (filter.layer !== context.layer || !filter.definition.wrapProtocol) continue;
    top = await filter.definition.wrapProtocol(top, filter.options, context);
  }
  return top;
}

/** Opens a layer's image filters; closes the ones opened if a later one fails. */
export async function openImageFilters(
  filters: readonly ResolvedFilter[],
  context: FilterContext & { virtualSize: number },
): Promise<ImageFilter[]> {
  const opened: ImageFilter[] = [];
  try {
    for (const filter of filters) {
      if (filter.layer !== context.layer || !filter.definition.openImageFilter) continue;
      opened.push(await filter.definition.openImageFilter(filter.options, context));
    }
    return opened;
  } catch (error) {
    await Promise.allSettled(opened.map((filter) => filter.close?.()));
    throw error;
  }
}

/** Refuses filters whose layer is deeper than the chain that opened. */
export function checkLayers(filters: readonly ResolvedFilter[], chainLength: number, path: string): void {
  const beyond = filters.find((filter) => filter.layer >= chainLength);
  if (beyond) {
    const images = chainLength === 1 ? '1 image' : `${chainLength} images`;
    throw new InvalidArgumentError(`filter ${beyond.definition.name}: layer=${beyond.layer}, but the chain of ${path} has ${images} (layers 0-${chainLength - 1})`);
  }
}
