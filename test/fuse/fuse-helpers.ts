/**
 * Helpers for the FUSE integration tests: a per-test lab (a unique temp directory
 * that remembers every mount, loop device and daemon it made and takes them all
 * down in afterEach, even after a failure), running bin/imgmount, foreground
 * daemons as child processes (their exit status is the test's oracle), waiting,
 * and reading the QED need-check bit.
 *
 * These tests need root (/dev/fuse here is root-only; losetup and mount need it
 * anyway), /dev/fuse, fusermount and qemu-img; without them every suite is
 * reported as skipped, with the reason printed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import { findMount } from '../../src/fuse/mountinfo.js';
import { qemuTools, readU64, run, type RunResult } from '../helpers/qemu.js';

export const IMGMOUNT = fileURLToPath(new URL('../../bin/imgmount', import.meta.url));
const DAEMON_ENTRY = fileURLToPath(new URL('../../dist/fuse/daemon-entry.js', import.meta.url));
export const MiB = 1024 * 1024;

function which(program: string): boolean {
  return (process.env.PATH ?? '/usr/bin:/bin').split(':').some((dir) => existsSync(join(dir, program)));
}

/** Why the FUSE tests cannot run here, or undefined when they can. */
export function fuseProblem(tools: readonly string[] = []): string | undefined {
  if (process.platform !== 'linux') return 'FUSE tests run on Linux only';
  if (process.getuid?.() !== 0) return 'FUSE tests need root (loop devices, mount, /dev/fuse)';
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing (modprobe fuse)';
  if (!which('fusermount') && !which('fusermount3')) return 'fusermount is not installed (Debian package fuse3)';
  if (!qemuTools.available) return qemuTools.missing;
  const missing = tools.filter((tool) => !which(tool));
  if (missing.length > 0) return `${missing.join(', ')} not installed`;
  if (!existsSync(DAEMON_ENTRY)) throw new Error(`${DAEMON_ENTRY} is missing: run npm run build before the FUSE tests`);
  return undefined;
}

/** For describe.skipIf: prints why a suite is skipped. */
export function skipWithoutFuse(suite: string, tools: readonly string[] = []): boolean {
  const problem = fuseProblem(tools);
  if (problem !== undefined) console.warn(`skipping "${suite}": ${problem}`);
  return problem !== undefined;
}

/** Runs bin/imgmount; never throws for a non-zero exit. */
export function imgmount(args: readonly string[]): Promise<RunResult> {
  return run(IMGMOUNT, args);
}

/** Polls `condition` every 20 ms until it holds; fails after `timeoutMs` naming `what`. */
export async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await delay(20);
  }
}

/** Whether `pid` still runs; a zombie (an exited daemon its reaper has not collected yet) does not. */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

export async function isImgmountMount(mountpoint: string): Promise<boolean> {
  return (await findMount(mountpoint))?.type === 'fuse.imgmount';
}

/** QED header features (bytes 16..24), bit 0x02: the image was not closed cleanly. */
export async function needCheck(qedPath: string): Promise<boolean> {
  return ((await readU64(qedPath, 16)) & 0x02n) !== 0n;
}

/** An imgmount daemon running attached, as a child of the test. */
export class ForegroundDaemon {
  stderr = '';
  /** Settles when the process ends. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private ended = false;

  constructor(readonly child: ChildProcess) {
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (text: string) => (this.stderr += text));
    child.stdout?.resume();
    this.exited = new Promise((resolve) =>
      child.on('exit', (code, signal) => {
        this.ended = true;
        resolve({ code, signal });
      }),
    );
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return !this.ended;
  }

  /** Waits until `mountpoint` is our mount (or fails with the daemon's stderr if it ended). */
  async ready(mountpoint: string): Promise<void> {
    await waitFor(`the foreground daemon to mount ${mountpoint}`, async () => {
      if (this.ended) throw new Error(`the foreground daemon ended before mounting: ${this.stderr}`);
      return isImgmountMount(mountpoint);
    });
  }
}

/** A scratch area for one test; cleanup() undoes everything it set up. */
export class MountLab {
  private readonly mountpoints: string[] = [];
  private readonly innerMounts: string[] = [];
  private readonly loops: string[] = [];
  private readonly daemons: ForegroundDaemon[] = [];
  private readonly pids: number[] = [];

  private constructor(readonly dir: string) {}

  static async create(): Promise<MountLab> {
    return new MountLab(await mkdtemp('/tmp/imgmount-fuse-test-'));
  }

  path(...parts: string[]): string {
    return join(this.dir, ...parts);
  }

  /** A fresh empty directory to mount on. */
  async mountpoint(name = 'mnt'): Promise<string> {
    const path = this.path(name);
    await mkdir(path, { recursive: true });
    this.mountpoints.push(path);
    return path;
  }

  async file(name: string, content: Buffer): Promise<string> {
    const path = this.path(name);
    await writeFile(path, content);
    return path;
  }

  /** Mounts in the background (the default mode) with a log; fails the test unless imgmount exits 0. */
  async mount(args: readonly string[], mountpoint: string): Promise<{ result: RunResult; log: string; pid: number }> {
    this.mountpoints.push(mountpoint);
    const log = this.path(`daemon-${this.pids.length + 1}.log`);
    const result = await imgmount(['--log', log, ...args, mountpoint]);
    if (result.code !== 0) throw new Error(`imgmount ${args.join(' ')} ${mountpoint} exited ${result.code}: ${result.stderr}`);
    const pid = await daemonPid(log);
    this.pids.push(pid);
    return { result, log, pid };
  }

  /** Starts `imgmount --foreground ARGS... MOUNTPOINT` and waits for the mount. */
  async foreground(args: readonly string[], mountpoint: string): Promise<ForegroundDaemon> {
    this.mountpoints.push(mountpoint);
    const daemon = new ForegroundDaemon(spawn(IMGMOUNT, ['--foreground', ...args, mountpoint], { stdio: ['ignore', 'pipe', 'pipe'] }));
    this.daemons.push(daemon);
    await daemon.ready(mountpoint);
    return daemon;
  }

  /** losetup on a file; detached in cleanup unless the test did it. */
  async loop(file: string, readOnly = false): Promise<string> {
    const result = await run('losetup', [...(readOnly ? ['-r'] : []), '-f', '--show', file]);
    if (result.code !== 0) throw new Error(`losetup ${file}: ${result.stderr}`);
    const device = result.stdout.trim();
    this.loops.push(device);
    return device;
  }

  /** losetup -d; a device the test detached is not detached again in cleanup (another test may own it by then). */
  async unloop(device: string): Promise<void> {
    const result = await run('losetup', ['-d', device]);
    if (result.code !== 0) throw new Error(`losetup -d ${device}: ${result.stderr}`);
    this.loops.splice(this.loops.indexOf(device), 1);
  }

  /** Remembers a mount made by the test (ext4 on a loop device...) for cleanup. */
  track(innerMount: string): void {
    this.innerMounts.push(innerMount);
  }

  /** Takes everything down (innermost first), then removes the directory. Never throws. */
  async cleanup(): Promise<void> {
    for (const mount of this.innerMounts.reverse()) {
      if (await findMount(mount)) await run('umount', ['-l', mount]).catch(() => undefined);
    }
    for (const device of this.loops.reverse()) await run('losetup', ['-d', device]).catch(() => undefined);
    for (const mountpoint of this.mountpoints) {
      if (await isImgmountMount(mountpoint)) await run('umount', ['-l', mountpoint]).catch(() => undefined);
    }
    // Unmounted daemons exit by themselves; anything left is killed by its pid.
    const pids = [...this.pids, ...this.daemons.map((daemon) => daemon.pid)].filter((pid) => pid > 0);
    await waitFor('the daemons to exit', () => pids.every((pid) => !isAlive(pid)), 5000).catch(() => undefined);
    for (const pid of pids) if (isAlive(pid)) process.kill(pid, 'SIGKILL');
    await rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** The pid a background daemon logged ("... (pid N)"). */
export async function daemonPid(logFile: string): Promise<number> {
  const matches = [...(await readFile(logFile, 'utf8')).matchAll(/serving .* \(pid (\d+)\)/g)];
  const last = matches[matches.length - 1];
  if (!last) throw new Error(`no "serving ... (pid N)" line in ${logFile}`);
  return Number(last[1]);
}

/** Waits for a background daemon to end and returns the status it logged. */
export async function backgroundExitStatus(pid: number, logFile: string): Promise<number> {
  await waitFor(`daemon ${pid} to exit`, () => !isAlive(pid));
  const statuses = [...(await readFile(logFile, 'utf8')).matchAll(/exiting with status (\d+)/g)];
  const last = statuses[statuses.length - 1];
  if (!last) throw new Error(`daemon ${pid} ended without logging its status:\n${await readFile(logFile, 'utf8')}`);
  return Number(last[1]);
}

/**
 * Pids of background imgmount daemons whose command line names `mountpoint`: as
 * spawned (`node .../daemon-entry.js MOUNTPOINT ...`) or once they have set their
 * title (`imgmount IMAGE... on MOUNTPOINT`).
 */
export async function daemonsFor(mountpoint: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const commandLine = await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '');
    const args = commandLine.split('\0');
    const spawned = args.some((arg) => arg.endsWith('daemon-entry.js')) && args.includes(mountpoint);
    const titled = args[0]!.startsWith('imgmount ') && args[0]!.endsWith(` on ${mountpoint}`);
    if ((spawned || titled) && isAlive(Number(entry))) pids.push(Number(entry));
  }
  return pids;
}
