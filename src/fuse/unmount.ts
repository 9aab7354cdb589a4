/**
 * `imgmount unmount MOUNTPOINT`: unmount (never lazily) and return only once the
 * daemon has closed every image, so that the next command sees clean images.
 * Who may unmount is the kernel's decision, through fusermount.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { BlockError, InvalidArgumentError } from '../block/index.js';
import { Errno } from './errno.js';
import { watchDaemon } from './control.js';
import { log } from './log.js';
import { findMount } from './mountinfo.js';
import { MOUNT_TYPE } from './options.js';
import { fusermount } from './session.js';

export async function unmountAndWait(mountpoint: string): Promise<void> {
  const absolute = resolve(mountpoint);
  // The mount's root of a dead daemon cannot be stat'ed; the path as given then serves.
  const real = await realpath(absolute).catch(() => absolute);
  const entry = await findMount(real);
  if (!entry) throw new InvalidArgumentError(`${mountpoint} is not mounted`);
  if (entry.type !== MOUNT_TYPE) {
    throw new InvalidArgumentError(`${mountpoint} is not an imgmount mount (it is ${entry.type} from ${entry.source})`);
  }
  const daemon = await watchDaemon(real);
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
  if (!result.ok) throw new BlockError(`the daemon (pid ${daemon.pid}) could not close every image cleanly: ${result.error ?? 'see its log'}`, Errno.EIO);
}
