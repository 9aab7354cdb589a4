/**
 * The daemon's notification channel, so that `imgmount unmount` returns only once
 * every image is closed and the daemon has exited, and can say whether closing
 * went well.
 *
 * A Unix socket in a directory that only the daemon's user can enter (mode 0700,
 * owned by that user), named after the mount point: only the mount's owner and
 * root can connect, so no other local user can take connections from the owner,
 * hold the daemon's file descriptors, or learn anything. The kernel checks that
 * (search permission on the directory), which is what SO_PEERCRED would have
 * told the daemon; Node.js cannot read SO_PEERCRED. There is no limit on
 * connections: only the owner and root can make them. The directory is the first
 * usable of
 *
 *   /run/user/UID/imgmount   (when /run/user/UID exists and belongs to UID)
 *   /run/imgmount            (root)
 *   /tmp/imgmount-UID
 *
 * each created with mode 0700 if missing, and used only when it is a real
 * directory (not a symbolic link) owned by UID with no access for others, both
 * by the daemon and by the client, who finds the owner's UID in the mount table
 * (user_id=). A directory someone else made first is skipped; when none is usable
 * the daemon runs without the channel, and `imgmount unmount` then unmounts
 * without waiting. The socket carries no commands (who may unmount is the
 * kernel's decision, through fusermount). Lines of JSON:
 *
 *   daemon -> client, on connect:      {"pid":1234}
 *   daemon -> client, after closing:   {"closed":true,"ok":true} or {"closed":true,"ok":false,"error":"..."}
 *
 * after which the daemon exits without hanging up first: the end of the
 * connection is the end of the process. A client connects before unmounting.
 */
import { createHash } from 'node:crypto';
import { chmod, lstat, mkdir, readFile, unlink } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { log } from './log.js';

/** The outcome of closing the images. */
export interface CloseResult {
  ok: boolean;
  error?: string;
}

/** The directories, in order of preference, where the sockets of `uid`'s daemons may be. */
export function controlDirectories(uid: number): string[] {
  return [`/run/user/${uid}/imgmount`, ...(uid === 0 ? ['/run/imgmount'] : []), `/tmp/imgmount-${uid}`];
}

/** The socket's name in its directory, for `mountpoint` (an absolute, real path). */
export function controlName(mountpoint: string): string {
  return createHash('sha256').update(mountpoint).digest('hex').slice(0, 40);
}

/** Whether `dir` is a directory (not a link) of `uid` that nobody else may enter. */
async function trusted(dir: string, uid: number): Promise<boolean> {
  const info = await lstat(dir).catch(() => undefined);
  return info !== undefined && info.isDirectory() && info.uid === uid && (info.mode & 0o077) === 0;
}

/** The daemon's directory: the first candidate that exists or can be made, and can be trusted. */
async function daemonDirectory(uid: number): Promise<string | undefined> {
  for (const dir of controlDirectories(uid)) {
    if (dir.startsWith('/run/user/') && !(await ownedBy(join(dir, '..'), uid))) continue;
    await mkdir(dir, { mode: 0o700 }).catch(() => undefined);
    const info = await lstat(dir).catch(() => undefined);
    if (info?.isDirectory() && info.uid === uid && (info.mode & 0o077) !== 0) await chmod(dir, 0o700).catch(() => undefined);
    if (await trusted(dir, uid)) return dir;
    log('not using %s for the notification channel: not a private directory of uid %d', dir, uid);
  }
  return undefined;
}

async function ownedBy(path: string, uid: number): Promise<boolean> {
  const info = await lstat(path).catch(() => undefined);
  return info !== undefined && info.isDirectory() && info.uid === uid;
}

/** The daemon's side. */
export class ControlServer {
  private readonly clients = new Set<Socket>();

  private constructor(private readonly server: Server) {
    server.on('connection', (socket) => {
      this.clients.add(socket);
      socket.on('error', () => socket.destroy());
      socket.on('close', () => this.clients.delete(socket));
      socket.write(`${JSON.stringify({ pid: process.pid })}\n`);
    });
  }

  /** Listens for `mountpoint`; without a channel (no private directory, address taken...) the daemon works on, so this logs and returns undefined. */
  static async listen(mountpoint: string): Promise<ControlServer | undefined> {
    const uid = process.getuid?.() ?? 0;
    const dir = await daemonDirectory(uid);
    if (dir === undefined) {
      log('no notification channel for %s: no private directory; imgmount unmount will not wait for this daemon', mountpoint);
      return undefined;
    }
    const path = join(dir, controlName(mountpoint));
    try {
      // A socket left by a daemon that was killed answers nothing: remove it. One that
      // answers belongs to a live daemon for the same path (a mount over a mount).
      if (await answers(path)) throw new Error(`${path} belongs to another running daemon`);
      await unlink(path).catch(() => undefined);
      const server = createServer();
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => {
          server.off('error', reject);
          resolve();
        });
      });
      server.unref();
      return new ControlServer(server);
    } catch (error) {
      log('no notification channel for %s: %s; imgmount unmount will not wait for this daemon', mountpoint, (error as Error).message);
      return undefined;
    }
  }

  /**
   * Tells every client how closing went and stops listening (the socket file goes).
   * Waits (briefly) for the lines to be sent; the connections stay open until this
   * process ends, which is how a client learns that it has.
   */
  async announceClosed(result: CloseResult): Promise<void> {
    this.server.close(); // the listening socket (and its file) goes now; the clients' connections stay
    const line = `${JSON.stringify({ closed: true, ...result })}\n`;
    await Promise.all(
      [...this.clients].map(
        (socket) =>
          new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, 1000);
            socket.write(line, () => {
              clearTimeout(timer);
              resolve();
            });
          }),
      ),
    );
    for (const socket of this.clients) socket.unref();
  }
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection(path);
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** A connection to a running daemon, made before unmounting. */
export interface DaemonWatch {
  pid: number;
  /** How the daemon closed its images; undefined when it went away without saying. */
  closed: Promise<CloseResult | undefined>;
  /** Settles once the daemon's process has ended (true), or after `timeoutMs` (false). */
  exited(timeoutMs: number): Promise<boolean>;
  /** Hangs up without waiting. */
  cancel(): void;
}

/**
 * Connects to the daemon of `ownerUid` serving `mountpoint`; undefined when none
 * answers. Only directories that `ownerUid` owns and no one else may enter are
 * tried, so nobody else can pose as the daemon.
 */
export async function watchDaemon(mountpoint: string, ownerUid: number, greetingTimeoutMs = 2000): Promise<DaemonWatch | undefined> {
  for (const dir of controlDirectories(ownerUid)) {
    if (!(await trusted(dir, ownerUid))) continue;
    const watch = await connect(join(dir, controlName(mountpoint)), greetingTimeoutMs);
    if (watch) return watch;
  }
  return undefined;
}

async function connect(path: string, greetingTimeoutMs: number): Promise<DaemonWatch | undefined> {
  const socket = createConnection(path);
  const ended = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.on('error', () => undefined);
  const lines = readLines(socket);
  const greeting = await Promise.race([lines.next().catch(() => undefined), delay(greetingTimeoutMs, undefined, { ref: false }), ended.then(() => undefined)]);
  const pid = greeting && !greeting.done ? (parse(greeting.value) as { pid?: unknown } | undefined)?.pid : undefined;
  if (typeof pid !== 'number' || !Number.isSafeInteger(pid) || pid <= 0) {
    socket.destroy();
    return undefined;
  }
  const started = await startTime(pid);
  const closed = (async (): Promise<CloseResult | undefined> => {
    try {
      for await (const line of lines) {
        const message = parse(line) as { closed?: unknown; ok?: unknown; error?: unknown } | undefined;
        if (message?.closed === true) {
          return { ok: message.ok === true, error: typeof message.error === 'string' ? message.error : undefined };
        }
      }
    } catch {
      // The daemon went away.
    }
    return undefined;
  })();
  const exited = async (timeoutMs: number): Promise<boolean> => {
    const deadline = Date.now() + timeoutMs;
    // The connection ends when the process closes its files, on its way out; then
    // wait until the process itself is gone (or a zombie: it has exited).
    const timer = delay(timeoutMs, false, { ref: false });
    if ((await Promise.race([ended.then(() => true), timer])) === false) return false;
    for (let wait = 1; ; wait = Math.min(wait * 2, 20)) {
      if (!(await running(pid, started))) return true;
      if (Date.now() > deadline) return false;
      await delay(wait);
    }
  };
  return { pid, closed, exited, cancel: () => socket.destroy() };
}

/** The start time of `pid` (field 22 of /proc/PID/stat), so that a reused pid is not taken for the daemon. */
async function startTime(pid: number): Promise<string | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  return stat?.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/** Whether `pid` is still the same process and has not exited (a zombie has). */
async function running(pid: number, started: string | undefined): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (stat === undefined) return false;
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return fields[0] !== 'Z' && fields[0] !== 'X' && (started === undefined || fields[19] === started);
}

async function* readLines(socket: Socket): AsyncGenerator<string> {
  let pending = '';
  for await (const chunk of socket) {
    pending += (chunk as Buffer).toString('utf8');
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      yield pending.slice(0, newline);
      pending = pending.slice(newline + 1);
    }
  }
}

function parse(line: string): unknown {
  try {
    return JSON.parse(line);
  } catch {
    return undefined;
  }
}
