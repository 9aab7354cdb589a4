/**
 * The daemon's notification channel, so that `imgmount unmount` returns only once
 * every image is closed, and can say whether that went well.
 *
 * An abstract Unix socket (no file to go stale; it vanishes with the process) named
 * after the mount point. It carries no commands: who may unmount is decided by the
 * kernel through fusermount, so a stranger who connects learns only the daemon's
 * pid and when it is done. Lines of JSON:
 *
 *   daemon -> client, on connect:      {"pid":1234}
 *   daemon -> client, after closing:   {"closed":true,"ok":true} or {"closed":true,"ok":false,"error":"..."}
 *
 * then the daemon ends the connection. A client connects before unmounting.
 */
import { createHash } from 'node:crypto';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { log } from './log.js';

const MAX_CLIENTS = 32;

/** The outcome of closing the images. */
export interface CloseResult {
  ok: boolean;
  error?: string;
}

/** The abstract socket name of the daemon serving `mountpoint` (an absolute, real path). */
export function controlAddress(mountpoint: string): string {
  return `\0imgmount/${createHash('sha256').update(mountpoint).digest('hex').slice(0, 40)}`;
}

/** The daemon's side. */
export class ControlServer {
  private readonly clients = new Set<Socket>();

  private constructor(private readonly server: Server) {
    server.on('connection', (socket) => {
      if (this.clients.size >= MAX_CLIENTS) {
        socket.destroy();
        return;
      }
      this.clients.add(socket);
      socket.on('error', () => socket.destroy());
      socket.on('close', () => this.clients.delete(socket));
      socket.write(`${JSON.stringify({ pid: process.pid })}\n`);
    });
  }

  /** Listens for `mountpoint`; without a channel (address taken...) the daemon works on, so this logs and returns undefined. */
  static async listen(mountpoint: string): Promise<ControlServer | undefined> {
    const server = createServer();
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(controlAddress(mountpoint), () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (error) {
      log('no notification channel for %s: %s; imgmount unmount will not wait for this daemon', mountpoint, (error as Error).message);
      return undefined;
    }
    server.unref();
    return new ControlServer(server);
  }

  /** Tells every client how closing went, and stops listening. Waits (briefly) for the lines to be sent. */
  async announceClosed(result: CloseResult): Promise<void> {
    this.server.close();
    const line = `${JSON.stringify({ closed: true, ...result })}\n`;
    await Promise.all(
      [...this.clients].map(
        (socket) =>
          new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, 1000);
            socket.end(line, () => {
              clearTimeout(timer);
              resolve();
            });
          }),
      ),
    );
  }
}

/** A connection to a running daemon, made before unmounting. */
export interface DaemonWatch {
  pid: number;
  /** How the daemon closed its images; undefined when it went away without saying. */
  closed: Promise<CloseResult | undefined>;
  /** Hangs up without waiting. */
  cancel(): void;
}

/** Connects to the daemon serving `mountpoint`; undefined when none answers. */
export async function watchDaemon(mountpoint: string, greetingTimeoutMs = 2000): Promise<DaemonWatch | undefined> {
  const socket = createConnection(controlAddress(mountpoint));
  const lines = readLines(socket);
  const greeting = await Promise.race([
    lines.next(),
    delay(greetingTimeoutMs, undefined, { ref: false }),
    new Promise<undefined>((resolve) => socket.once('error', () => resolve(undefined))),
  ]);
  const pid = greeting && !greeting.done ? (parse(greeting.value) as { pid?: unknown } | undefined)?.pid : undefined;
  if (typeof pid !== 'number') {
    socket.destroy();
    return undefined;
  }
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
  return { pid, closed, cancel: () => socket.destroy() };
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
