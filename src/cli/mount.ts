/**
 * `imgmount [options] IMAGE... MOUNTPOINT` and `imgmount unmount MOUNTPOINT`
 * (also `imgmount -u MOUNTPOINT`): turns the command line into a MountConfig and
 * runs the daemon, detached by default (returning once the mount is ready) or
 * attached with --foreground. Notices and errors are one line each on stderr.
 *
 * The common case, a background mount without -o, does not come here: main.ts
 * sends it to background.ts, which loads neither the block layer nor FUSE.
 */
import { realpath } from 'node:fs/promises';
import { InvalidArgumentError } from '../block/errors.js';
import { parseMountOptions } from '../fuse/options.js';
import { planMount, startBackground, type MountArguments, type MountPlan } from './background.js';
import { reportError } from './errors.js';

export type { MountArguments, MountPlan } from './background.js';

/**
 * Combines the long options with `-o` (a flag set either way is set; a format or
 * name given both ways must agree) and resolves every path. -d without --log
 * implies --foreground, as for other FUSE tools: a background daemon's debug
 * output needs a log file to go to.
 */
export function mountPlan(args: MountArguments, cwd = process.cwd()): MountPlan {
  return planMount(args, parseMountOptions(args.options ?? []), cwd);
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
  if (!plan.foreground) {
    await startBackground(plan);
    return;
  }
  // The mount table and the daemon's notification channel use the real path.
  plan.config.mountpoint = await realpath(plan.config.mountpoint).catch(() => plan.config.mountpoint);
  // Whatever a library left on the event loop, a foreground daemon ends when its
  // mount has ended: an explicit exit.
  try {
    const { runDaemon } = await import('../fuse/daemon.js');
    if (plan.config.logFile !== undefined) (await import('../fuse/log.js')).logToFile(plan.config.logFile);
    process.exitCode = await runDaemon(plan.config, { notice: printNotice, ready: () => undefined });
  } catch (error) {
    reportError(error);
  }
  process.exit();
}

/** The unmount command: returns once the daemon has closed every image and exited. */
export async function runUnmount(args: { mountpoint: string }): Promise<void> {
  await (await import('../fuse/unmount.js')).unmountAndWait(args.mountpoint);
}
