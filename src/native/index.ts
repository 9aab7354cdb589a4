/**
 * The native addon (native/imgmount.c, built into build/Release/imgmount.node
 * by `npm run build`): the Linux system calls Node.js cannot make, and nothing
 * else. It owns polling an fd on the event loop (how /dev/fuse is read on the
 * main thread), reading into and writev-ing from Buffers on such an fd,
 * mount(2)/umount2(2), fd passing over a Unix socket (fusermount3's
 * _FUSE_COMMFD), fallocate and SEEK_DATA/SEEK_HOLE, page-cache-only reads
 * (preadv2 RWF_NOWAIT), the open-file-description byte locks qemu takes, and
 * FUSE_DEV_IOC_CLONE, with the constants they use: TypeScript never hard-codes
 * one. Everything else stays TypeScript.
 *
 * Errors: the addon returns a negative errno; each wrapper here turns it into
 * an Error with `code` ('EAGAIN'...), `errno` (positive) and `syscall` set,
 * except where a result is expected in normal operation and returned instead:
 * `readInto` and `preadNowait` return -EAGAIN (and `preadNowait` -EOPNOTSUPP),
 * `ofdLock` returns false when the range is locked elsewhere. EINTR is retried
 * in C. Bad argument types or ranges give EINVAL, never a crash.
 *
 * Threading rules:
 * - Call everything on the JavaScript thread that imported this module (the
 *   main thread, or a worker: each thread loads its own instance and has its
 *   own poll ids; an id is meaningless on another thread).
 * - All calls except the poll ones are synchronous system calls on that
 *   thread: use them on non-blocking fds (readInto, writev on /dev/fuse),
 *   non-blocking by nature (recvFd uses MSG_DONTWAIT, preadNowait never waits
 *   for the disk, ofdLock never waits for a lock), or where a short block is
 *   acceptable (mount, umount2, fallocate, lseek). The caller keeps each
 *   Buffer alive and unchanged in size during the call; nothing is retained.
 * - `pollStart` callbacks run on the same thread, from the event loop, each
 *   time the fd is readable (level-triggered: again on the next loop turn if
 *   not drained). `status < 0` means the poll hit an error and has stopped
 *   (libuv reports POLLERR as EBADF: for /dev/fuse, the connection ended);
 *   still call `pollStop` to free it. After `pollStop` returns no callback
 *   runs, even if it is called from inside the callback. An exception thrown
 *   by a callback is an uncaught exception. `pollStart` makes the fd
 *   non-blocking (libuv does, documented) and `pollRef(id, false)` lets the
 *   process exit while the poll is open. Polls are closed when the thread ends.
 */
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { fileURLToPath } from 'node:url';
import { getSystemErrorMap } from 'node:util';

/** The constants the calls use, as the C headers define them. */
export interface NativeConstants {
  readonly SEEK_SET: number;
  readonly SEEK_CUR: number;
  readonly SEEK_END: number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly F_RDLCK: number;
  readonly F_WRLCK: number;
  readonly F_UNLCK: number;
  readonly MS_RDONLY: number;
  readonly MS_NOSUID: number;
  readonly MS_NODEV: number;
  readonly MS_NOEXEC: number;
  readonly MS_NOATIME: number;
  readonly MNT_FORCE: number;
  readonly MNT_DETACH: number;
  readonly MNT_EXPIRE: number;
  readonly UMOUNT_NOFOLLOW: number;
  readonly FUSE_DEV_IOC_CLONE: number;
}

/** The addon as loaded: every function returns a negative errno on failure. */
interface Addon {
  pollStart(fd: number, callback: (status: number) => void): number;
  pollStop(id: number): number;
  pollRef(id: number, ref: boolean): number;
  readInto(fd: number, buffer: Uint8Array, offset: number, length: number): number;
  writev(fd: number, buffers: readonly Uint8Array[]): number;
  setNonblocking(fd: number, on: boolean): number;
  mount(source: string, target: string, fstype: string, flags: number, data: string | null): number;
  umount2(target: string, flags: number): number;
  socketpair(): [number, number] | number;
  recvFd(socketFd: number): number;
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  preadNowait(fd: number, buffer: Uint8Array, bufferOffset: number, length: number, position: number): number;
  ofdLock(fd: number, type: number, start: number, length: number): number;
  ofdTest(fd: number, type: number, start: number, length: number): number;
  ioctlClone(fd: number, sessionFd: number): number;
  constants: NativeConstants;
}

/** The built addon, from the package root (this file is src/native/index.ts or dist/native/index.js). */
export const ADDON_PATH = fileURLToPath(new URL('../../build/Release/imgmount.node', import.meta.url));

function load(): Addon {
  try {
    return createRequire(import.meta.url)(ADDON_PATH) as Addon;
  } catch (error) {
    const reason = String((error as Error).message ?? error).split('\n')[0];
    throw new Error(`cannot load the native addon ${ADDON_PATH} (${reason}): run \`npm run build\``);
  }
}

const addon = load();

export const constants: NativeConstants = Object.freeze({ ...addon.constants });

const { EACCES, EAGAIN, ENXIO, EOPNOTSUPP } = osConstants.errno;

let systemErrors: Map<number, [string, string]> | undefined;
const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(osConstants.errno)) if (!errnoNames.has(value)) errnoNames.set(value, name);

/** An Error for a negative errno, like Node's own system errors: "EAGAIN: resource temporarily unavailable, read" with code, errno, syscall. */
export function errnoError(result: number, syscall: string): NodeJS.ErrnoException {
  systemErrors ??= getSystemErrorMap(); // built anew by Node on every call: keep one
  const known = systemErrors.get(result); // libuv's names, as Node's fs errors have them (ENOTSUP for 95)
  const code = known?.[0] ?? errnoNames.get(-result) ?? `E${-result}`;
  const error: NodeJS.ErrnoException = new Error(`${code}: ${known?.[1] ?? `errno ${-result}`}, ${syscall}`);
  error.code = code;
  error.errno = -result;
  error.syscall = syscall;
  return error;
}

function check(result: number, syscall: string): number {
  if (result < 0) throw errnoError(result, syscall);
  return result;
}

/** Calls `callback(status)` on this thread each time `fd` is readable; returns the poll's id. */
export function pollStart(fd: number, callback: (status: number) => void): number {
  return check(addon.pollStart(fd, callback), 'pollStart');
}

/** Stops and frees a poll; no callback runs after this returns. */
export function pollStop(id: number): void {
  check(addon.pollStop(id), 'pollStop');
}

/** Whether an open poll keeps the process alive (true, the default) or not. */
export function pollRef(id: number, ref: boolean): void {
  check(addon.pollRef(id, ref), 'pollRef');
}

/** read(2) into buffer[offset, offset + length): the count read (0 at end of file), or -EAGAIN when a non-blocking fd has nothing. */
export function readInto(fd: number, buffer: Uint8Array, offset = 0, length = buffer.byteLength - offset): number {
  const result = addon.readInto(fd, buffer, offset, length);
  return result === -EAGAIN ? result : check(result, 'read');
}

/** writev(2) of the buffers in one system call (a FUSE reply: header and payload, no copy); the count written. */
export function writev(fd: number, buffers: readonly Uint8Array[]): number {
  return check(addon.writev(fd, buffers), 'writev');
}

/** Sets or clears O_NONBLOCK (an fd received from fusermount3 arrives blocking). */
export function setNonblocking(fd: number, on = true): void {
  check(addon.setNonblocking(fd, on), 'fcntl');
}

/** mount(2) (root): e.g. a FUSE mount with data `fd=N,rootmode=40000,user_id=0,group_id=0`. */
export function mount(source: string, target: string, fstype: string, flags = 0, data: string | null = null): void {
  check(addon.mount(source, target, fstype, flags, data), 'mount');
}

/** umount2(2) (root) with MNT_DETACH, MNT_FORCE... */
export function umount2(target: string, flags = 0): void {
  check(addon.umount2(target, flags), 'umount2');
}

/** A connected AF_UNIX stream pair: [ours (close-on-exec), the child's (inheritable; close it here once the child has it)]. */
export function socketpair(): [number, number] {
  const result = addon.socketpair();
  if (typeof result === 'number') throw errnoError(result, 'socketpair');
  return result;
}

/** An fd sent with SCM_RIGHTS (close-on-exec here); never blocks: EAGAIN when none has arrived yet, ENOMSG at end of stream or for a message without one. */
export function recvFd(socketFd: number): number {
  return check(addon.recvFd(socketFd), 'recvmsg');
}

/** fallocate(2): constants.FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, or FALLOC_FL_ZERO_RANGE. */
export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  check(addon.fallocate(fd, mode, offset, length), 'fallocate');
}

/** lseek(2), 64-bit (offsets below 2^53): constants.SEEK_DATA / SEEK_HOLE; ENXIO (thrown, `code` 'ENXIO') past the last data. */
export function lseek(fd: number, offset: number, whence: number): number {
  return check(addon.lseek(fd, offset, whence), 'lseek');
}

/** lseek(2) for SEEK_DATA / SEEK_HOLE on a hot path: -1 instead of a thrown ENXIO (no data past `offset`). */
export function seekExtent(fd: number, offset: number, whence: number): number {
  const result = addon.lseek(fd, offset, whence);
  return result === -ENXIO ? -1 : check(result, 'lseek');
}

/**
 * preadv2(RWF_NOWAIT): reads only what is in the page cache. The count read
 * (short when only the start is cached, 0 at end of file), -EAGAIN when the
 * first byte is not cached, -EOPNOTSUPP on a file system without RWF_NOWAIT.
 */
export function preadNowait(fd: number, buffer: Uint8Array, bufferOffset: number, length: number, position: number): number {
  const result = addon.preadNowait(fd, buffer, bufferOffset, length, position);
  return result === -EAGAIN || result === -EOPNOTSUPP ? result : check(result, 'preadv2');
}

/**
 * Takes (F_RDLCK, F_WRLCK) or releases (F_UNLCK) an open-file-description lock
 * on [start, start + length) (length 0: to the end) without waiting: true when
 * done, false when a conflicting lock is held through another open.
 */
export function ofdLock(fd: number, type: number, start: number, length: number): boolean {
  const result = addon.ofdLock(fd, type, start, length);
  if (result === -EAGAIN || result === -EACCES) return false;
  check(result, 'fcntl(F_OFD_SETLK)');
  return true;
}

/**
 * Whether a lock of `type` could be taken on the range: constants.F_UNLCK when
 * free, else the type of a conflicting lock held through another open
 * (F_RDLCK is 0, so test against F_UNLCK, not for truthiness).
 */
export function ofdTest(fd: number, type: number, start: number, length: number): number {
  return check(addon.ofdTest(fd, type, start, length), 'fcntl(F_OFD_GETLK)');
}

/** FUSE_DEV_IOC_CLONE: a freshly opened /dev/fuse `fd` then serves the connection of `sessionFd` too. */
export function ioctlClone(fd: number, sessionFd: number): void {
  check(addon.ioctlClone(fd, sessionFd), 'ioctl(FUSE_DEV_IOC_CLONE)');
}
