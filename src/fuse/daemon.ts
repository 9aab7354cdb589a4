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
 * - SIGKILL: nothing runs; the QED need-check bit stays set and the next mount's
 *   open repairs the image and says so.
 * A signal before the mount is ready abandons the start and closes what was opened.
 *
 * Background mode (the default): startDaemon() spawns a detached copy of this
 * module's entry (daemon-entry.ts) with an IPC channel, sends it the resolved
 * configuration, relays its notices, and returns only when it reports the mount
 * ready, or fails with the daemon's one-line error (the daemon has then removed
 * whatever it had mounted). Its stdout and stderr are the --log file or /dev/null.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BlockError, InvalidArgumentError, openImage } from '../index.js';
import type { BlockImage } from '../block/index.js';
import { ControlServer } from './control.js';
import { Errno } from './errno.js';
import { ImageFilesystem, type MountedImage } from './filesystem.js';
import { enableDaemonLog, log } from './log.js';
import { findMount } from './mountinfo.js';
import { kernelMountOptions, MOUNT_TYPE, mountFileNames, type MountConfig } from './options.js';
import { checkMountpoint, FuseSession, fusermount, isDisconnected } from './session.js';

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
      session = await FuseSession.mount(config.mountpoint, filesystem, kernelMountOptions({ ...config, readOnly }));
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
    allowFiles: config.allowFiles,
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
  const entry = fileURLToPath(new URL('./daemon-entry.js', import.meta.url));
  const child = spawn(process.execPath, [entry, config.mountpoint], {
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
      child.on('message', (message: FromDaemon) => {
        if (message.type === 'notice') notice(message.line);
        else if (message.type === 'ready' && interrupted === undefined) resolve();
        else if (message.type === 'error') reject(new InvalidArgumentError(message.message));
      });
      child.on('error', (error) => reject(new BlockError(`cannot start the daemon: ${error.message}`, Errno.EIO)));
      child.on('exit', (code, signal) => {
        if (interrupted !== undefined) reject(new BlockError(`interrupted by ${interrupted}; nothing is mounted`, Errno.EINTR));
        const log = config.logFile ? `; see ${config.logFile}` : '';
        reject(new BlockError(`the daemon ended (${signal ?? `status ${code}`}) before the mount was ready${log}`, Errno.EIO));
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
  const entry = await findMount(mountpoint).catch(() => undefined);
  if (entry?.type !== MOUNT_TYPE || !(await isDisconnected(mountpoint))) return;
  await fusermount(['-u', '-z', mountpoint]).catch(() => undefined);
}
