/**
 * `imgmount [options] IMAGE... MOUNTPOINT` and `imgmount unmount MOUNTPOINT`
 * (also `imgmount -u MOUNTPOINT`): turns the command line into a MountConfig and
 * runs the daemon, detached by default (returning once the mount is ready) or
 * attached with --foreground. Notices and errors are one line each on stderr.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { InvalidArgumentError, parseSize } from '../block/index.js';
import { runDaemon, startDaemon } from '../fuse/daemon.js';
import { logToFile } from '../fuse/log.js';
import { parseMountOptions, type MountConfig } from '../fuse/options.js';
import { unmountAndWait } from '../fuse/unmount.js';
import { reportError } from './errors.js';

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
  /** `--allow-files DIR` (repeatable): where backing and data files may lie. */
  allowFiles?: string[];
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

/**
 * Combines the long options with `-o` (a flag set either way is set; a format or
 * name given both ways must agree) and resolves every path. -d without --log
 * implies --foreground, as for other FUSE tools: a background daemon's debug
 * output needs a log file to go to.
 */
export function mountPlan(args: MountArguments, cwd = process.cwd()): MountPlan {
  const settings = parseMountOptions(args.options ?? []);
  if (args.paths.length < 2) {
    throw new InvalidArgumentError('give at least one IMAGE and the MOUNTPOINT: imgmount [options] IMAGE... MOUNTPOINT');
  }
  const format = agree('format', args.format, settings.format);
  const name = agree('name', args.name, settings.name);
  const snapshot = agree('snapshot', args.snapshot, settings.snapshot);
  const logFile = agree('log', args.log, settings.logFile);
  const cacheSize = agree('cache-size', args.cacheSize, settings.cacheSize);
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
    allowFiles: args.allowFiles && args.allowFiles.length > 0 ? args.allowFiles.map((dir) => resolve(cwd, dir)) : undefined,
  };
  const foreground = (args.foreground ?? false) || (settings.foreground ?? false) || (debug && logFile === undefined);
  return { config, foreground };
}

function agree(option: string, long: string | undefined, fromO: string | undefined): string | undefined {
  if (long !== undefined && fromO !== undefined && long !== fromO) {
    throw new InvalidArgumentError(`--${option} ${long} and -o ${option}=${fromO} disagree`);
  }
  return long ?? fromO;
}

function printNotice(line: string): void {
  process.stderr.write(`imgmount: ${line}\n`);
}

/** The mount command. */
export async function runMount(args: MountArguments): Promise<void> {
  if (args.unmount) {
    if (args.paths.length !== 1) throw new InvalidArgumentError('-u takes exactly one MOUNTPOINT');
    await runUnmount({ mountpoint: args.paths[0] });
    return;
  }
  const plan = mountPlan(args);
  // The mount table and the daemon's notification channel use the real path.
  plan.config.mountpoint = await realpath(plan.config.mountpoint).catch(() => plan.config.mountpoint);
  if (!plan.foreground) {
    await startDaemon(plan.config, printNotice);
    return;
  }
  // Whatever a library left on the event loop, a foreground daemon ends when its
  // mount has ended: an explicit exit.
  try {
    if (plan.config.logFile !== undefined) logToFile(plan.config.logFile);
    process.exitCode = await runDaemon(plan.config, { notice: printNotice, ready: () => undefined });
  } catch (error) {
    reportError(error);
  }
  process.exit();
}

/** The unmount command: returns once the daemon has closed every image. */
export async function runUnmount(args: { mountpoint: string }): Promise<void> {
  await unmountAndWait(args.mountpoint);
}
