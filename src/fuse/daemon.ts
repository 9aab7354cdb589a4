/**
 * The daemon's life: open the images, mount them, serve until the file system is
 * unmounted, then close every image cleanly (flush, clear need-check, close) and
 * end with status 0 (1 if an image could not be closed).
 *
 * Every way out leads through the same close:
 * - `umount`, `fusermount -u`, `imgmount unmount`, or a lazy unmount once its last
 *   user is gone: the session reports that the kernel let go (session.ts);
 * - SIGTERM, SIGINT, SIGHUP: the daemon unmounts itself, never lazily. A busy mount
 *   (open files, a loop device) stays up and keeps being served, with a log line,
 *   rather than pulling the disk from under its users;
 * - SIGKILL: nothing runs. An image written within the last --idle-clean seconds
 *   (default 5) keeps its need-check / dirty bit set and the next mount's open
 *   repairs it and says so; one idle longer was marked clean and needs nothing.
 * A signal before the mount is ready abandons the start and closes what was opened.
 *
 * Background mode (the default): startDaemon() in src/cli/background.ts spawns a
 * detached daemon-entry.ts with an IPC channel, sends it the resolved
 * configuration, relays its notices, and returns only when it reports the mount
 * ready, or fails with the daemon's one-line error (the daemon has then removed
 * whatever it had mounted). Its stdout and stderr are the --log file or /dev/null;
 * its process title is `imgmount IMAGE... on MOUNTPOINT`.
 */
import { BlockError, openImage } from '../index.js';
import type { BlockImage } from '../block/index.js';
import { ControlServer } from './control.js';
import { Errno } from './errno.js';
import { ImageFilesystem, type MountedImage } from './filesystem.js';
import { enableDaemonLog, log } from './log.js';
import { kernelMountOptions, mountFileNames, type MountConfig } from './options.js';
import { checkMountpoint, FuseSession } from './session.js';

/** What the daemon tells whoever started it. */
export interface DaemonEvents {
  /** A line the user should see: a repair made on open, a read-only fallback. */
  notice(line: string): void;
  /** The mount is ready to use. */
  ready(): void;
}

/** Messages on the IPC channel of a background daemon. */
export type ToDaemon = { type: 'start'; config: MountConfig };
export type FromDaemon = { type: 'notice'; line: string } | { type: 'ready' } | { type: 'error'; message: string };

const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;

/**
 * Runs a mount in this process until it is unmounted; resolves with the exit status.
 * Failures before the mount is ready are thrown (nothing is left mounted or open).
 */
export async function runDaemon(config: MountConfig, events: DaemonEvents): Promise<number> {
  enableDaemonLog(config.debug);
  keepServingOnUnexpectedErrors();
  const stops = new StopRequests();
  const notice = (line: string): void => {
    log('%s', line);
    events.notice(line);
  };
  try {
    const names = mountFileNames(config.images, config.name);
    await checkMountpoint(config.mountpoint, { nonempty: config.nonempty, allowOther: config.allowOther, notice });
    const opened: MountedImage[] = [];
    let session: FuseSession;
    let filesystem: ImageFilesystem;
    try {
      for (const [index, path] of config.images.entries()) {
        stops.throwIfRequested();
        opened.push({ name: names[index], image: await openForMount(path, config, notice) });
      }
      stops.throwIfRequested();
      filesystem = new ImageFilesystem(opened);
      const readOnly = config.readOnly || opened.every(({ image }) => image.readOnly);
      session = await FuseSession.mount(config.mountpoint, filesystem, kernelMountOptions({ ...config, readOnly }), config.busyPollUs);
    } catch (error) {
      await closeImages(opened.map(({ image }) => image));
      throw error;
    }
    const control = await ControlServer.listen(config.mountpoint);
    log('serving %s at %s (pid %d)', opened.map(({ image, name }) => `${image.path} as ${name}`).join(', '), config.mountpoint, process.pid);
    events.ready();

    await serveUntilUnmounted(session, stops);
    await session.drain();
    const failures = await closeImages(opened.map(({ image }) => image));
    const status = failures.length === 0 ? 0 : 1;
    await control?.announceClosed(status === 0 ? { ok: true } : { ok: false, error: failures.join('; ') });
    log('exiting with status %d', status);
    return status;
  } finally {
    stops.dispose();
  }
}

/** Waits for the kernel to let go; a stop signal makes the daemon unmount itself (never lazily). */
async function serveUntilUnmounted(session: FuseSession, stops: StopRequests): Promise<void> {
  const ended = session.ended.then(() => undefined);
  for (;;) {
    const signal = await Promise.race([ended, stops.next()]);
    if (signal === undefined) return;
    log('%s: unmounting %s', signal, session.mountpoint);
    try {
      await session.unmount();
      return;
    } catch (error) {
      log('cannot unmount %s: %s; still serving (close what uses it, then unmount or signal again)', session.mountpoint, (error as Error).message);
    }
  }
}

/** Opens an image for the mount; an image file this user cannot write is mounted read-only, with a notice. */
async function openForMount(path: string, config: MountConfig, notice: (line: string) => void): Promise<BlockImage> {
  const options = {
    readOnly: config.readOnly,
    format: config.format,
    snapshot: config.snapshot,
    metadataCacheBytes: config.cacheBytes,
    idleCleanSeconds: config.idleCleanSeconds,
    allowFiles: config.allowFiles,
    filters: config.filters,
    formatOptions: config.formatOptions,
    notice,
  };
  try {
    return await openImage(path, options);
  } catch (error) {
    const notWritable = [Errno.EACCES, Errno.EPERM, Errno.EROFS];
    if (config.readOnly || !(error instanceof BlockError) || !notWritable.includes(error.errno)) throw error;
    const image = await openImage(path, { ...options, readOnly: true });
    notice(`${path} is not writable (${error.message}); mounting it read-only`);
    return image;
  }
}

/** Closes every image (each independently); returns one line per failure. */
async function closeImages(images: readonly BlockImage[]): Promise<string[]> {
  const failures: string[] = [];
  await Promise.all(
    images.map(async (image) => {
      try {
        await image.close();
        log('closed %s', image.path);
      } catch (error) {
        const line = `closing ${image.path} failed: ${oneLine(error)}`;
        log('%s', line);
        failures.push(line);
      }
    }),
  );
  return failures;
}

/** One line for a person: the message of an expected error, more detail in the log otherwise. */
export function oneLine(error: unknown): string {
  if (error instanceof Error) return error.message.replace(/\s*\n\s*/g, ' ');
  return String(error);
}

/** A bug in a handler must not take the mount down (an aborted mount loses the clean close). */
function keepServingOnUnexpectedErrors(): void {
  process.on('uncaughtException', (error) => log('unexpected error, still serving: %O', error));
  process.on('unhandledRejection', (reason) => log('unexpected rejection, still serving: %O', reason));
}

/** SIGTERM / SIGINT / SIGHUP, queued: one stop request per signal. */
class StopRequests {
  private readonly queue: string[] = [];
  private waiting: ((signal: string) => void) | undefined;
  private readonly handler = (signal: NodeJS.Signals): void => {
    log('received %s', signal);
    if (this.waiting) {
      const wake = this.waiting;
      this.waiting = undefined;
      wake(signal);
    } else {
      this.queue.push(signal);
    }
  };

  constructor() {
    for (const signal of STOP_SIGNALS) process.on(signal, this.handler);
  }

  next(): Promise<string> {
    const queued = this.queue.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    return new Promise((resolve) => (this.waiting = resolve));
  }

  throwIfRequested(): void {
    if (this.queue.length > 0) throw new BlockError(`interrupted by ${this.queue[0]} before the mount was ready`, Errno.EINTR);
  }

  dispose(): void {
    for (const signal of STOP_SIGNALS) process.off(signal, this.handler);
  }
}
