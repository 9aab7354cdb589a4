/**
 * `imgmount unmount MOUNTPOINT`: unmount (never lazily) and return only once the
 * daemon has closed every image and exited, so that the next command sees clean
 * images and no daemon. Who may unmount is the kernel's decision, through fusermount.
 */
import { readFile, realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { BlockError, InvalidArgumentError } from '../block/errors.js';
import { Errno } from './errno.js';
import { watchDaemon } from './control.js';
import { log } from './log.js';
import { findMount } from './mountinfo.js';
import { MOUNT_TYPE } from './options.js';
import { fusermount } from './session.js';

/** How long a daemon that has closed its images may take to exit. */
const EXIT_TIMEOUT_MS = 30_000;

export async function unmountAndWait(mountpoint: string): Promise<void> {
  const absolute = resolve(mountpoint);
  // The mount's root of a dead daemon cannot be stat'ed; the path as given then serves.
  const real = await realpath(absolute).catch(() => absolute);
  const entry = await findMount(real);
  if (!entry) throw new InvalidArgumentError(`${mountpoint} is not mounted`);
  if (entry.type !== MOUNT_TYPE) {
    throw new InvalidArgumentError(`${mountpoint} is not an imgmount mount (it is ${entry.type} from ${entry.source})`);
  }
  const owner = (await mountOwner(entry.id)) ?? process.getuid?.() ?? 0;
  const daemon = await watchDaemon(real, owner);
  try {
    await fusermount(['-u', real]);
  } catch (error) {
    daemon?.cancel();
    const message = (error as Error).message;
    const hint = /busy/i.test(message) ? ' (a file in it is open, or a loop device is attached)' : '';
    throw new BlockError(`${message}${hint}`, (error as BlockError).errno ?? Errno.EIO);
  }
  if (!daemon) {
    log('no daemon answered for %s; unmounted without waiting for it', real);
    return;
  }
  const result = await daemon.closed;
  if (!result) throw new BlockError(`the daemon (pid ${daemon.pid}) ended without confirming that the images were closed; see its log`, Errno.EIO);
  const exited = await daemon.exited(EXIT_TIMEOUT_MS);
  if (!result.ok) throw new BlockError(`the daemon (pid ${daemon.pid}) could not close every image cleanly: ${result.error ?? 'see its log'}`, Errno.EIO);
  if (!exited) throw new BlockError(`the daemon (pid ${daemon.pid}) closed every image but has not exited after ${EXIT_TIMEOUT_MS / 1000} s`, Errno.EIO);
}

/** The user a FUSE mount belongs to: its `user_id=` super option in /proc/self/mountinfo. */
export async function mountOwner(mountId: number): Promise<number | undefined> {
  const text = await readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    if (Number(fields[0]) !== mountId) continue;
    const separator = fields.indexOf('-', 6);
    const superOptions = separator < 0 ? undefined : fields[separator + 3];
    const match = superOptions?.match(/(?:^|,)user_id=(\d+)(?:,|$)/);
    return match ? Number(match[1]) : undefined;
  }
  return undefined;
}
