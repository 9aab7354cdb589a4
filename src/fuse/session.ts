/**
 * The kernel side of one mount, through fuse-native: checking the mount point,
 * mounting with our libfuse options, noticing when the kernel lets go of the file
 * system (whoever unmounted it), and unmounting.
 *
 * What fuse-native 2.2.6 does, read from its index.js / fuse-native.c and measured:
 *
 * - Options: `_fuseOptions()` joins its known options into one `-oa,b,c` argument
 *   that fuse_mount() and fuse_new() both parse. It knows no big_writes/max_write
 *   (the kernel then splits writes into 4 KiB requests), and it adds libfuse's
 *   `debug` whenever $DEBUG contains a `*`. FuseMount overrides `_fuseOptions()`
 *   to hand over exactly our list (options.ts); fuse-native keeps 1023 bytes of it.
 * - Timeout: unless `timeout: false`, fuse-native answers ETIMEDOUT after 15 s while
 *   the JavaScript handler is still running (a slow flush would look failed).
 * - Unmount from outside (umount, fusermount -u, umount -l): libfuse's loop thread
 *   sees the connection end and tears down in C; fuse-native tells JavaScript
 *   nothing and keeps the process alive (its uv_async handle stays referenced).
 *   We watch the mount's root with inotify instead: the kernel queues IN_UNMOUNT
 *   when the super block goes away, a few milliseconds after umount returns, and
 *   after a lazy unmount only once the last user (an open file, a loop device) has
 *   let go -- exactly when the images may be closed. The watch lives in a worker
 *   thread because adding it resolves the path through this very file system, whose
 *   requests only the main thread can answer. Should the watch fail, we poll the
 *   mount table every second instead.
 */
import { execFile } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { open, readdir, readFile, stat, statfs } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import Fuse from 'fuse-native';
import { BlockError, InvalidArgumentError } from '../block/index.js';
import { Errno } from './errno.js';
import { log } from './log.js';
import { findMount, isMounted } from './mountinfo.js';
import { MOUNT_TYPE } from './options.js';

/** fuse-native with our libfuse option list instead of the one it builds. */
class FuseMount extends Fuse {
  constructor(
    mountpoint: string,
    operations: Fuse.Operations,
    private readonly optionArgument: string,
  ) {
    super(mountpoint, operations, { timeout: false });
  }

  protected override _fuseOptions(): string {
    return this.optionArgument;
  }
}

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
  /** Resolves once the file system is unmounted and no longer in use: after this no request can come. */
  readonly ended: Promise<void>;
  private markEnded!: () => void;
  private hasEnded = false;
  private watcher: Worker | undefined;
  private poller: NodeJS.Timeout | undefined;

  private constructor(
    readonly mountpoint: string,
    /** Our line in /proc/self/mountinfo. */
    readonly mountId: number,
  ) {
    this.ended = new Promise((resolve) => (this.markEnded = resolve));
  }

  /** Mounts `operations` at `mountpoint` (checked by checkMountpoint) and resolves once the kernel can send requests. */
  static async mount(mountpoint: string, operations: Fuse.Operations, fuseOptions: readonly string[]): Promise<FuseSession> {
    const optionArgument = `-o${fuseOptions.join(',')}`;
    if (optionArgument.length > 1023 || Buffer.byteLength(mountpoint) > 1000) {
      throw new InvalidArgumentError(`mount point path or libfuse options too long for fuse-native (${mountpoint})`);
    }
    const fuse = new FuseMount(mountpoint, operations, optionArgument);
    log('mounting %s with %s', mountpoint, optionArgument);
    try {
      await new Promise<void>((resolve, reject) => fuse.mount((error) => (error ? reject(error) : resolve())));
    } catch (error) {
      await removeFailedMount(mountpoint);
      const reason = (error as Error).message === 'fuse failed' ? 'libfuse refused (its own message is in the log)' : (error as Error).message;
      throw new InvalidArgumentError(`cannot mount on ${mountpoint}: ${reason}`);
    }
    const entry = await findMount(mountpoint);
    if (!entry || entry.type !== MOUNT_TYPE) {
      throw new BlockError(`mounted ${mountpoint} but cannot find it in /proc/self/mountinfo`, Errno.EIO);
    }
    const session = new FuseSession(mountpoint, entry.id);
    await session.watchForUnmount();
    log('mounted %s (mount id %d, device %s)', mountpoint, entry.id, entry.device);
    return session;
  }

  /**
   * Unmounts (never lazily: a busy mount fails with fusermount's message and stays
   * up) and resolves once the kernel has let go of the file system.
   */
  async unmount(): Promise<void> {
    if (this.hasEnded) return;
    await fusermount(['-u', this.mountpoint]);
    log('unmounted %s', this.mountpoint);
    const slow = setTimeout(() => {
      log('%s is unmounted here, but the kernel still holds the file system (another mount namespace?); serving until it lets go', this.mountpoint);
    }, 10_000);
    await this.ended;
    clearTimeout(slow);
  }

  /** Starts the inotify watch (or polling) and resolves once it is in place, before anyone is told the mount is ready. */
  private watchForUnmount(): Promise<void> {
    return new Promise((resolve) => {
      const worker = new Worker(WATCHER_SOURCE, { eval: true, workerData: { mountpoint: this.mountpoint } });
      this.watcher = worker;
      worker.unref();
      worker.on('message', (message: { watching?: true; event?: string; error?: string }) => {
        if (message.error !== undefined) {
          log('cannot watch %s for unmount (%s); polling the mount table instead', this.mountpoint, message.error);
          this.startPolling();
        } else {
          // Also right after the watch was added: an unmount before it would have been missed.
          void this.checkStillMounted();
        }
        resolve();
      });
      worker.on('error', (error) => {
        log('unmount watcher failed (%s); polling the mount table instead', error.message);
        this.startPolling();
        resolve();
      });
    });
  }

  private startPolling(): void {
    this.poller ??= setInterval(() => void this.checkStillMounted(), 1000);
  }

  private async checkStillMounted(): Promise<void> {
    let mounted: boolean;
    try {
      mounted = await isMounted(this.mountId);
    } catch (error) {
      log('cannot read the mount table: %s', (error as Error).message);
      return;
    }
    if (mounted || this.hasEnded) return;
    this.hasEnded = true;
    clearInterval(this.poller);
    void this.watcher?.terminate();
    log('the kernel has let go of %s', this.mountpoint);
    this.markEnded();
  }
}

/**
 * The watcher thread: reports inotify events on the mount's root. IN_UNMOUNT
 * arrives as 'rename'; 'change' events (writes to the files) are not forwarded.
 */
const WATCHER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { watch } = require('node:fs');
try {
  const watcher = watch(workerData.mountpoint, (event) => {
    if (event === 'rename') parentPort.postMessage({ event });
  });
  watcher.on('error', (error) => parentPort.postMessage({ error: String(error && error.message) }));
  parentPort.postMessage({ watching: true });
} catch (error) {
  parentPort.postMessage({ error: String(error && error.message) });
}
`;

/** After a failed mount, takes away a mount libfuse may have left (fuse_new can fail after fuse_mount). */
async function removeFailedMount(mountpoint: string): Promise<void> {
  const entry = await findMount(mountpoint).catch(() => undefined);
  if (entry?.type !== MOUNT_TYPE) return;
  log('removing the half-made mount at %s', mountpoint);
  await fusermount(['-u', '-z', mountpoint]).catch((error: Error) => log('cannot remove it: %s', error.message));
}
