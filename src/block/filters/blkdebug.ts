/**
 * blkdebug: fault injection after QEMU's filter of the same name. A rule
 * names a driver event (events.ts) and an errno; when the event fires, the
 * next request that reaches the file below (read, write, flush, truncate,
 * hole punch) fails with that errno instead of running. `once=on` lets a rule
 * fire only the first time, `nth=K` only at the Kth occurrence of its event;
 * without either it fires at every occurrence.
 *
 *   --filter blkdebug:event=l2_update,errno=5,once=on
 *   --filter blkdebug:config=rules.ini     ([inject-error] sections, QEMU's syntax)
 *
 * Concurrency: events and requests come from one thread; a fired rule fails
 * whichever request reaches the file next (as in QEMU), so tests that want a
 * precise victim issue one request at a time.
 */
import { readFile } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { BLOCK_EVENTS, type BlockEvent } from '../events.js';
import { HostIoError, InvalidArgumentError, hostIoError } from '../errors.js';
import type { HostOffset, Protocol } from '../types.js';
import { ProtocolFilter } from './protocol-filter.js';
import type { FilterDefinition, FilterOptions } from './types.js';
import createDebug from 'debug';

const log = createDebug('imgmount:blkdebug');

interface Rule {
  event: BlockEvent;
  errno: number;
  once: boolean;
  nth: number | undefined;
  /** How often the event has fired so far. */
  seen: number;
  /** A once/nth rule that has fired. */
  spent: boolean;
}

/** An injection waiting for the next request. */
interface Armed {
  event: BlockEvent;
  errno: number;
}

const RULE_KEYS = ['event', 'errno', 'once', 'nth'] as const;

export const blkdebug: FilterDefinition = {
  name: 'blkdebug',
  summary: 'fail requests after driver events: event=NAME,errno=N[,once=on][,nth=K] or config=FILE',
  keys: [...RULE_KEYS, 'config'],
  validate(options) {
    if (options.config !== undefined) {
      const inline = RULE_KEYS.filter((key) => options[key] !== undefined);
      if (inline.length > 0) throw new InvalidArgumentError(`filter blkdebug: config= cannot be combined with ${inline.join(', ')}=`);
      return;
    }
    parseRule(options, 'filter blkdebug');
  },
  async wrapProtocol(inner, options) {
    const rules = options.config !== undefined ? await readConfig(options.config) : [parseRule(options, 'filter blkdebug')];
    return new BlkdebugProtocol(inner, rules);
  },
};

class BlkdebugProtocol extends ProtocolFilter {
  private readonly armed: Armed[] = [];

  constructor(
    inner: Protocol,
    private readonly rules: Rule[],
  ) {
    super(inner);
  }

  override event(name: BlockEvent): void {
    for (const rule of this.rules) {
      if (rule.event !== name || rule.spent) continue;
      rule.seen += 1;
      if (rule.nth !== undefined && rule.seen !== rule.nth) continue;
      if (rule.once || rule.nth !== undefined) rule.spent = true;
      log('%s: %s fired; the next request fails with errno %d', this.path, name, rule.errno);
      this.armed.push({ event: name, errno: rule.errno });
    }
    super.event(name);
  }

  override read(offset: HostOffset, buffer: Buffer): Promise<void> {
    return this.inject(`read at ${offset} from`) ?? super.read(offset, buffer);
  }

  override write(offset: HostOffset, buffer: Buffer): Promise<void> {
    return this.inject(`write at ${offset} to`) ?? super.write(offset, buffer);
  }

  override flush(): Promise<void> {
    return this.inject('flush of') ?? super.flush();
  }

  override truncate(length: number): Promise<void> {
    return this.inject(`truncate to ${length} of`) ?? super.truncate(length);
  }

  protected override punchHoleBelow(offset: HostOffset, length: number): Promise<void> {
    return this.inject(`hole punch at ${offset} in`) ?? super.punchHoleBelow(offset, length);
  }

  /** The failure of a fired rule, if one is waiting. */
  private inject(operation: string): Promise<never> | undefined {
    const armed = this.armed.shift();
    if (!armed) return undefined;
    const error = new HostIoError(`${operation} ${this.path}: ${errnoName(armed.errno)} injected by blkdebug after ${armed.event}`, armed.errno);
    return Promise.reject(error);
  }
}

function parseRule(options: FilterOptions, where: string): Rule {
  const event = options.event;
  if (event === undefined) throw new InvalidArgumentError(`${where}: event= is needed (one of ${BLOCK_EVENTS.join(', ')})`);
  if (!(BLOCK_EVENTS as readonly string[]).includes(event)) {
    throw new InvalidArgumentError(`${where}: unknown event '${event}' (one of ${BLOCK_EVENTS.join(', ')})`);
  }
  if (options.errno === undefined) throw new InvalidArgumentError(`${where}: errno= is needed (a number such as 5, or a name such as EIO)`);
  return {
    event: event as BlockEvent,
    errno: parseErrno(options.errno, where),
    once: parseSwitch(options.once ?? 'off', 'once', where),
    nth: options.nth === undefined ? undefined : parsePositive(options.nth, 'nth', where),
    seen: 0,
    spent: false,
  };
}

function parseErrno(text: string, where: string): number {
  const byName = (osConstants.errno as Record<string, number>)[text.toUpperCase()];
  if (byName !== undefined) return byName;
  if (/^[0-9]+$/.test(text)) {
    const value = Number(text);
    if (value >= 1 && value <= 4095) return value;
  }
  throw new InvalidArgumentError(`${where}: errno=${text} is not an errno (1-4095, or a name such as EIO or ENOSPC)`);
}

function parseSwitch(text: string, key: string, where: string): boolean {
  if (text === 'on' || text === 'true') return true;
  if (text === 'off' || text === 'false') return false;
  throw new InvalidArgumentError(`${where}: ${key}=${text} must be on or off`);
}

function parsePositive(text: string, key: string, where: string): number {
  if (!/^[0-9]+$/.test(text) || Number(text) < 1 || !Number.isSafeInteger(Number(text))) {
    throw new InvalidArgumentError(`${where}: ${key}=${text} must be a whole number from 1`);
  }
  return Number(text);
}

function errnoName(value: number): string {
  const entry = Object.entries(osConstants.errno).find(([, number]) => number === value);
  return entry ? entry[0] : `errno ${value}`;
}

/**
 * Reads QEMU's blkdebug configuration syntax: `[inject-error]` sections of
 * `key = "value"` lines (quotes optional; `#` and `;` start comments).
 */
async function readConfig(path: string): Promise<Rule[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (error) {
    throw hostIoError('filter blkdebug: cannot read config', path, error);
  }
  const rules: Rule[] = [];
  let section: Record<string, string> | undefined;
  let sectionLine = 0;
  const finish = () => {
    if (section) rules.push(parseRule(section, `filter blkdebug: ${path} line ${sectionLine}`));
  };
  const lines = text.split(/\r?\n/);
  for (const [index, raw] of lines.entries()) {
    const line = raw.replace(/^\s+|\s+$/g, '');
    const where = `filter blkdebug: ${path} line ${index + 1}`;
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const header = /^\[([^\]]+)\]$/.exec(line);
    if (header) {
      finish();
      if (header[1] !== 'inject-error') throw new InvalidArgumentError(`${where}: [${header[1]}] sections are not supported here (only [inject-error])`);
      section = {};
      sectionLine = index + 1;
      continue;
    }
    const pair = /^([a-z_-]+)\s*=\s*"?([^"]*)"?$/.exec(line);
    if (!pair) throw new InvalidArgumentError(`${where}: expected key = "value", found '${line}'`);
    if (!section) throw new InvalidArgumentError(`${where}: ${pair[1]} comes before any [inject-error] section`);
    if (!(RULE_KEYS as readonly string[]).includes(pair[1]!)) {
      throw new InvalidArgumentError(`${where}: key '${pair[1]}' is not supported here (${RULE_KEYS.join(', ')})`);
    }
    section[pair[1]!] = pair[2]!;
  }
  finish();
  if (rules.length === 0) throw new InvalidArgumentError(`filter blkdebug: ${path} has no [inject-error] section`);
  return rules;
}
