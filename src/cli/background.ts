/**
 * The mount command's plan, and starting a background daemon: what the command
 * process of `imgmount IMAGE... MOUNTPOINT` needs, and nothing more. It loads
 * neither the block layer nor FUSE (the daemon does), so the daemon starts as
 * soon as the command line is read; without -o, main.ts comes here directly.
 *
 * The daemon (src/fuse/daemon-entry.ts) is a detached node process with an IPC
 * channel: it gets the resolved configuration, relays notices, and reports the
 * mount ready, or fails with its one-line error (it has then removed whatever
 * it had mounted). Its stdout and stderr are the --log file or /dev/null. Its
 * command line holds the process title it sets, `imgmount IMAGE... on
 * MOUNTPOINT` (Node.js can only shorten the original command line's memory).
 */
import { parseOpenOptions } from './open-options.js';
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { realpath } from 'node:fs/promises';
import { constants } from 'node:os';
import { basename, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlockError, InvalidArgumentError } from '../block/errors.js';
import { parseSize } from '../block/size.js';
import { parseIdleCleanSeconds } from '../block/idle-clean.js';
import { FILE_OPTION_KEYS, parseFilterArgument } from '../block/filters/spec.js';
import type { FilterSpec } from '../block/filters/types.js';
import type { FromDaemon, ToDaemon } from '../fuse/daemon.js';
import type { MountConfig, MountOptionSettings } from '../fuse/options.js';

export interface MountArguments {
  /** IMAGE... MOUNTPOINT (or, with `unmount`, just MOUNTPOINT). */
  paths: string[];
  format?: string;
  /** `-s`: an internal snapshot to mount (read-only). */
  snapshot?: string;
  readOnly?: boolean;
  allowOther?: boolean;
  name?: string;
  foreground?: boolean;
  debug?: boolean;
  log?: string;
  /** L2 cache bound per image, e.g. "64M". */
  cacheSize?: string;
  /** `--idle-clean SECONDS`: mark images clean after this long without writes (0: off). */
  idleClean?: string;
  /** `--busy-poll MICROSECONDS`: longest busy poll of /dev/fuse after the last reply (0: off). */
  busyPoll?: string;
  /** `--allow-files DIR` (repeatable): where backing and data files may lie. */
  allowFiles?: string[];
  /** `--filter NAME[:key=value,...]` (repeatable): filters on every image of the mount. */
  filters?: string[];
  /** `--open-option KEY=VALUE` (repeatable): format open options, for every image of the mount. */
  openOptions?: string[];
  /** `-o` lists, mount(8) style. */
  options?: string[];
  /** `-u`: unmount the one path given. */
  unmount?: boolean;
}

/** What to run: the resolved mount configuration, and whether to stay attached. */
export interface MountPlan {
  config: MountConfig;
  foreground: boolean;
}

/** The plan from the long options and the already parsed `-o` settings (mount.ts's mountPlan parses them). */
export function planMount(args: MountArguments, settings: MountOptionSettings, cwd = process.cwd()): MountPlan {
  if (args.paths.length < 2) {
    throw new InvalidArgumentError('give at least one IMAGE and the MOUNTPOINT: imgmount [options] IMAGE... MOUNTPOINT');
  }
  const format = agree('format', args.format, settings.format);
  const name = agree('name', args.name, settings.name);
  const snapshot = agree('snapshot', args.snapshot, settings.snapshot);
  const logFile = agree('log', args.log, settings.logFile);
  const cacheSize = agree('cache-size', args.cacheSize, settings.cacheSize);
  const idleClean = agree('idle-clean', args.idleClean, settings.idleClean);
  const busyPoll = agree('busy-poll', args.busyPoll, settings.busyPoll);
  const debug = (args.debug ?? false) || (settings.debug ?? false);
  const images = args.paths.slice(0, -1).map((path) => resolve(cwd, path));
  const config: MountConfig = {
    images,
    mountpoint: resolve(cwd, args.paths[args.paths.length - 1]),
    format,
    snapshot,
    readOnly: (args.readOnly ?? false) || (settings.readOnly ?? false) || snapshot !== undefined,
    allowOther: (args.allowOther ?? false) || (settings.allowOther ?? false),
    name,
    debug,
    logFile: logFile === undefined ? undefined : resolve(cwd, logFile),
    nonempty: settings.nonempty ?? false,
    cacheBytes: cacheSize === undefined ? undefined : parseSize(cacheSize, 'cache size'),
    idleCleanSeconds: idleClean === undefined ? undefined : parseIdleCleanSeconds(idleClean),
    allowFiles: args.allowFiles && args.allowFiles.length > 0 ? args.allowFiles.map((dir) => resolve(cwd, dir)) : undefined,
    filters: mountFilters(args.filters ?? [], images.length, cwd),
    formatOptions: parseOpenOptions(args.openOptions),
    busyPollUs: busyPoll === undefined ? undefined : parseBusyPollUs(busyPoll),
  };
  const foreground = (args.foreground ?? false) || (settings.foreground ?? false) || (debug && logFile === undefined);
  return { config, foreground };
}

/** The mount's filters; one that names a file (a reference, a log) applies to one image only. */
function mountFilters(texts: readonly string[], imageCount: number, cwd: string): FilterSpec[] | undefined {
  if (texts.length === 0) return undefined;
  const specs = texts.map((text) => parseFilterArgument(text, cwd));
  const withFile = specs.find((spec) => FILE_OPTION_KEYS.some((key) => key !== 'config' && spec[key] !== undefined));
  if (withFile && imageCount > 1) {
    throw new InvalidArgumentError(`--filter ${withFile.name} names a file and applies to one image; mount the ${imageCount} images separately`);
  }
  return specs;
}

/** Longest `--busy-poll` accepted, in microseconds. */
const MAX_BUSY_POLL_US = 1000;

/** `--busy-poll MICROSECONDS`: a whole number from 0 (off) to 1000. */
export function parseBusyPollUs(text: string): number {
  const match = /^\s*(\d+)\s*$/.exec(text);
  const value = match ? Number(match[1]) : NaN;
  if (!match || value > MAX_BUSY_POLL_US) {
    throw new InvalidArgumentError(`invalid --busy-poll '${text}': expected whole microseconds from 0 to ${MAX_BUSY_POLL_US} (0 turns busy polling off)`);
  }
  return value;
}

function agree(option: string, long: string | undefined, fromO: string | undefined): string | undefined {
  if (long !== undefined && fromO !== undefined && long !== fromO) {
    throw new InvalidArgumentError(`--${option} ${long} and -o ${option.replace(/-/g, '_')}=${fromO} disagree`);
  }
  return long ?? fromO;
}

function printNotice(line: string): void {
  process.stderr.write(`imgmount: ${line}\n`);
}

/**
 * The mount command when it can run from here: no -o (whose parser lives with
 * the FUSE code), no -u, not in the foreground. Returns false otherwise.
 */
export async function runBackgroundMount(args: MountArguments): Promise<boolean> {
  if (args.unmount || (args.options?.length ?? 0) > 0) return false;
  const plan = planMount(args, {});
  if (plan.foreground) return false;
  await startBackground(plan);
  return true;
}

/** Starts the daemon of a background plan and returns once its mount is ready. */
export async function startBackground(plan: MountPlan): Promise<void> {
  // The mount table and the daemon's notification channel use the real path.
  plan.config.mountpoint = await realpath(plan.config.mountpoint).catch(() => plan.config.mountpoint);
  await startDaemon(plan.config, printNotice);
}

/** The daemon's process title: `imgmount disk.qed on /mnt/x` (image names, the mount point's real path). */
export function daemonTitle(config: MountConfig): string {
  return `imgmount ${config.images.map((image) => basename(image)).join(' ')} on ${config.mountpoint}`;
}

const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;
const { EINTR, EIO } = constants.errno;

/**
 * Starts a background daemon for `config` and resolves with its pid once the mount
 * is ready; rejects with the daemon's one-line error otherwise.
 */
export async function startDaemon(config: MountConfig, notice: (line: string) => void): Promise<number> {
  let output: number | 'ignore' = 'ignore';
  if (config.logFile !== undefined) {
    try {
      output = openSync(config.logFile, 'a', 0o600);
    } catch (error) {
      throw new InvalidArgumentError(`cannot open log file ${config.logFile}: ${(error as Error).message}`);
    }
  }
  const entry = fileURLToPath(new URL('../fuse/daemon-entry.js', import.meta.url));
  // The last argument is the title the daemon sets: it makes the command line long enough to hold it.
  const child = spawn(process.execPath, [entry, config.mountpoint, daemonTitle(config)], {
    detached: true,
    cwd: '/',
    stdio: ['ignore', output, output, 'ipc'],
    // File I/O runs on libuv's pool; 4 threads (the default) would cap concurrent requests.
    env: { ...process.env, UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? '16' },
  });
  if (typeof output === 'number') closeSync(output);

  // Interrupted while starting: the daemon gets SIGTERM, abandons the start or
  // unmounts again at once, and this command fails instead of reporting a mount.
  let interrupted: string | undefined;
  const forward = (signal: NodeJS.Signals): void => {
    interrupted = signal;
    child.kill('SIGTERM');
  };
  for (const signal of STOP_SIGNALS) process.on(signal, forward);
  try {
    await new Promise<void>((resolve, reject) => {
      // A daemon that could not mount says why, then exits: this command fails
      // only once it has, so that nothing of the attempt is left running.
      let failure: string | undefined;
      child.on('message', (message: FromDaemon) => {
        if (message.type === 'notice') notice(message.line);
        else if (message.type === 'ready' && interrupted === undefined) resolve();
        else if (message.type === 'error') {
          failure = message.message;
          setTimeout(() => reject(new InvalidArgumentError(message.message)), 5000).unref();
        }
      });
      child.on('error', (error) => reject(new BlockError(`cannot start the daemon: ${error.message}`, EIO)));
      child.on('exit', (code, signal) => {
        if (interrupted !== undefined) reject(new BlockError(`interrupted by ${interrupted}; nothing is mounted`, EINTR));
        if (failure !== undefined) reject(new InvalidArgumentError(failure));
        const log = config.logFile ? `; see ${config.logFile}` : '';
        reject(new BlockError(`the daemon ended (${signal ?? `status ${code}`}) before the mount was ready${log}`, EIO));
      });
      child.send({ type: 'start', config } satisfies ToDaemon);
    });
  } catch (error) {
    await removeLeftoverMount(config.mountpoint);
    throw error;
  } finally {
    for (const signal of STOP_SIGNALS) process.off(signal, forward);
  }
  child.disconnect();
  child.unref();
  return child.pid ?? 0;
}

/** A daemon that died while mounting can leave a dead mount behind (ENOTCONN); take it away. */
async function removeLeftoverMount(mountpoint: string): Promise<void> {
  const [{ findMount }, { MOUNT_TYPE }, { isDisconnected, fusermount }] = await Promise.all([
    import('../fuse/mountinfo.js'),
    import('../fuse/options.js'),
    import('../fuse/session.js'),
  ]);
  const entry = await findMount(mountpoint).catch(() => undefined);
  if (entry?.type !== MOUNT_TYPE || !(await isDisconnected(mountpoint))) return;
  await fusermount(['-u', '-z', mountpoint]).catch(() => undefined);
}
