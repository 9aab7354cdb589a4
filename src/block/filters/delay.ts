/**
 * The `delay` filter (nbdkit's delay filter is the model): every read, write
 * or flush of the layer's image file waits the given milliseconds before it
 * goes down, so a slow disk can be imitated: guests' and tools' timeouts,
 * requests interrupted by a signal while the daemon holds them, many requests
 * in flight at once.
 *
 *   --filter delay:read=200            reads wait 200 ms
 *   --filter delay:read=50,write=500,flush=1000
 *
 * Metadata reads and writes of the format wait too: the filter sits below it.
 * Hole punching, sizes and seeking pass through at once.
 *
 * Concurrency: each call waits on its own timer; calls overlap as they come.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { InvalidArgumentError } from '../errors.js';
import type { HostOffset, Protocol } from '../types.js';
import { ProtocolFilter } from './protocol-filter.js';
import type { FilterDefinition, FilterOptions } from './types.js';

const KEYS = ['read', 'write', 'flush'] as const;
/** Longest delay taken: ten minutes is already far past any timeout worth testing. */
const MAX_DELAY_MS = 600_000;

interface Delays {
  read: number;
  write: number;
  flush: number;
}

function parseDelays(options: FilterOptions): Delays {
  const delays: Delays = { read: 0, write: 0, flush: 0 };
  for (const key of KEYS) {
    const text = options[key];
    if (text === undefined) continue;
    if (!/^[0-9]+$/.test(text) || Number(text) > MAX_DELAY_MS) {
      throw new InvalidArgumentError(`filter delay: ${key}=${text} must be a number of milliseconds from 0 to ${MAX_DELAY_MS}`);
    }
    delays[key] = Number(text);
  }
  if (KEYS.every((key) => options[key] === undefined)) {
    throw new InvalidArgumentError(`filter delay: give at least one of ${KEYS.map((key) => `${key}=MS`).join(', ')}`);
  }
  return delays;
}

class DelayFilter extends ProtocolFilter {
  constructor(
    inner: Protocol,
    private readonly delays: Delays,
  ) {
    super(inner);
  }

  override async read(offset: HostOffset, buffer: Buffer): Promise<void> {
    if (this.delays.read > 0) await sleep(this.delays.read);
    await this.inner.read(offset, buffer);
  }

  override async write(offset: HostOffset, buffer: Buffer): Promise<void> {
    if (this.delays.write > 0) await sleep(this.delays.write);
    await this.inner.write(offset, buffer);
  }

  override async flush(): Promise<void> {
    if (this.delays.flush > 0) await sleep(this.delays.flush);
    await this.inner.flush();
  }
}

export const delay: FilterDefinition = {
  name: 'delay',
  summary: 'slow the image file down: read=MS,write=MS,flush=MS (each optional, at least one)',
  keys: KEYS,
  validate(options) {
    parseDelays(options);
  },
  async wrapProtocol(inner, options) {
    return new DelayFilter(inner, parseDelays(options));
  },
};
