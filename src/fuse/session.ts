/**
 * The kernel side of one mount: checking the mount point, mounting (kernel/mount.ts:
 * mount(2) as root, fusermount3 as an ordinary user), serving the /dev/fuse
 * connection (kernel/connection.ts), noticing when the kernel lets go of the file
 * system, and unmounting.
 *
 * Every unmount route (umount, fusermount -u, imgmount unmount, a lazy unmount once
 * its last user has let go) ends the same way: reads of /dev/fuse fail with ENODEV
 * once the kernel is done with the file system, and the connection's `ended`
 * resolves. Only then may the images be closed.
 */
import { execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { open, readdir, readFile, stat, statfs } from 'node:fs/promises';
import { BlockError, InvalidArgumentError } from '../block/errors.js';
import { KernelConnection, type KernelFilesystem } from './kernel/connection.js';
import { mountKernel, type KernelMountOptions } from './kernel/mount.js';
import { Errno } from './errno.js';
import { log } from './log.js';
import { findMount } from './mountinfo.js';
import { MOUNT_TYPE } from './options.js';

/** How long the kernel may take to send INIT after the mount. */
const INIT_TIMEOUT_MS = 10_000;

/** Fails with a clear line unless `mountpoint` can take a new mount. */
export async function checkMountpoint(
  mountpoint: string,
  options: { nonempty: boolean; allowOther: boolean; notice: (line: string) => void },
): Promise<void> {
  if (options.allowOther && process.getuid?.() !== 0 && !(await userAllowOther())) {
    throw new InvalidArgumentError("--allow-other needs 'user_allow_other' in /etc/fuse.conf when not mounting as root");
  }
  const existing = await findMount(mountpoint);
  if (existing) {
    if (existing.type === MOUNT_TYPE && (await isDisconnected(mountpoint))) {
      options.notice(`${mountpoint} still had the mount of an imgmount daemon that is gone; unmounting it`);
      await fusermount(['-u', mountpoint]);
    } else {
      throw new InvalidArgumentError(`${mountpoint} is already a mount point (${existing.type} from ${existing.source}); unmount it first`);
    }
  }
  let info;
  try {
    info = await stat(mountpoint);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new InvalidArgumentError(`mount point ${mountpoint} does not exist`);
    throw new InvalidArgumentError(`cannot use mount point ${mountpoint}: ${(error as Error).message}`);
  }
  if (!info.isDirectory()) throw new InvalidArgumentError(`mount point ${mountpoint} is not a directory`);
  if (!options.nonempty && (await readdir(mountpoint)).length > 0) {
    throw new InvalidArgumentError(`mount point ${mountpoint} is not empty (mount over it anyway with -o nonempty)`);
  }
  try {
    await (await open('/dev/fuse', fsConstants.O_RDWR)).close();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const hint = code === 'ENOENT' || code === 'ENODEV' ? ' (load the fuse kernel module: modprobe fuse)' : '';
    throw new InvalidArgumentError(`cannot use /dev/fuse: ${(error as Error).message}${hint}`);
  }
}

/** Whether /etc/fuse.conf lets ordinary users mount with allow_other (fusermount refuses otherwise). */
async function userAllowOther(): Promise<boolean> {
  const text = await readFile('/etc/fuse.conf', 'utf8').catch(() => '');
  return text.split('\n').some((line) => line.replace(/#.*/, '').trim() === 'user_allow_other');
}

/** A FUSE mount whose daemon is gone answers ENOTCONN. */
export async function isDisconnected(mountpoint: string): Promise<boolean> {
  try {
    await statfs(mountpoint);
    return false;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOTCONN';
  }
}

/** Runs fusermount (libfuse 2's name, then fuse3's); fails with its own message. */
export async function fusermount(args: readonly string[]): Promise<void> {
  for (const program of ['fusermount', 'fusermount3']) {
    const outcome = await new Promise<'missing' | 'ok' | BlockError>((resolve) => {
      execFile(program, args, { encoding: 'utf8' }, (error, _stdout, stderr) => {
        if (!error) resolve('ok');
        else if ((error as NodeJS.ErrnoException).code === 'ENOENT') resolve('missing');
        else {
          const message = firstLine(stderr).replace(/^fusermount3?: /, '') || error.message;
          resolve(new BlockError(message, /busy/i.test(message) ? Errno.EBUSY : Errno.EIO));
        }
      });
    });
    if (outcome === 'ok') return;
    if (outcome !== 'missing') throw outcome;
  }
  throw new BlockError('neither fusermount nor fusermount3 is installed (Debian package fuse3)', Errno.ENOENT);
}

function firstLine(text: string): string {
  return text.trim().split('\n')[0]?.trim() ?? '';
}

/** One mounted file system, from mount until the kernel has let go of it. */
export class FuseSession {
  private constructor(
    readonly mountpoint: string,
    /** Our line in /proc/self/mountinfo. */
    readonly mountId: number,
    private readonly connection: KernelConnection,
  ) {}

  /** Resolves once the file system is unmounted and no longer in use: after this no request can come. */
  get ended(): Promise<void> {
    return this.connection.ended;
  }

  /** Resolves once no request is being answered. */
  drain(): Promise<void> {
    return this.connection.drain();
  }

  /** Mounts `filesystem` at `mountpoint` (checked by checkMountpoint) and resolves once the kernel can send requests. */
  static async mount(mountpoint: string, filesystem: KernelFilesystem, options: KernelMountOptions, busyPollUs?: number): Promise<FuseSession> {
    const fd = await mountKernel(mountpoint, options);
    const connection = new KernelConnection(fd, filesystem, busyPollUs);
    try {
      await waitForInit(connection, mountpoint);
      const entry = await findMount(mountpoint);
      if (!entry || entry.type !== MOUNT_TYPE) {
        throw new BlockError(`mounted ${mountpoint} but cannot find it in /proc/self/mountinfo`, Errno.EIO);
      }
      log('mounted %s (mount id %d, device %s)', mountpoint, entry.id, entry.device);
      return new FuseSession(mountpoint, entry.id, connection);
    } catch (error) {
      await removeFailedMount(mountpoint);
      connection.close();
      throw error;
    }
  }

  /**
   * Unmounts (never lazily: a busy mount fails with fusermount's message and stays
   * up) and resolves once the kernel has let go of the file system.
   */
  async unmount(): Promise<void> {
    await fusermount(['-u', this.mountpoint]);
    log('unmounted %s', this.mountpoint);
    const slow = setTimeout(() => {
      log('%s is unmounted here, but the kernel still holds the file system (another mount namespace?); serving until it lets go', this.mountpoint);
    }, 10_000);
    await this.ended;
    clearTimeout(slow);
  }
}

/** The kernel sends INIT right after the mount; the mount is usable once it is answered. */
async function waitForInit(connection: KernelConnection, mountpoint: string): Promise<void> {
  const deadline = Date.now() + INIT_TIMEOUT_MS;
  while (!connection.ready) {
    if (Date.now() > deadline) throw new BlockError(`the kernel sent no FUSE INIT for ${mountpoint} within ${INIT_TIMEOUT_MS / 1000} s`, Errno.EIO);
    const ended = await Promise.race([connection.ended.then(() => true), new Promise<false>((resolve) => setTimeout(() => resolve(false), 2))]);
    if (ended) throw new BlockError(`the FUSE connection of ${mountpoint} ended before INIT`, Errno.EIO);
  }
}

/** After a failed mount, takes away the half-made mount (mounted, but never served). */
async function removeFailedMount(mountpoint: string): Promise<void> {
  const entry = await findMount(mountpoint).catch(() => undefined);
  if (entry?.type !== MOUNT_TYPE) return;
  log('removing the half-made mount at %s', mountpoint);
  await fusermount(['-u', '-z', mountpoint]).catch((error: Error) => log('cannot remove it: %s', error.message));
}
