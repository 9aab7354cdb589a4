/**
 * Getting a /dev/fuse connection for a mount point, and nothing else: the
 * kernel's side of mounting, without libfuse.
 *
 * - As root: open /dev/fuse (non-blocking) and mount(2) a `fuse.imgmount`
 *   file system with `fd=N,rootmode=40000,user_id=,group_id=` and our options.
 * - As an ordinary user: run fusermount3 (setuid root) with the other end of a
 *   socketpair as `_FUSE_COMMFD`; it mounts and sends the /dev/fuse fd back
 *   over the socket (SCM_RIGHTS), which we receive with the native addon.
 *
 * Unmounting stays with fusermount (session.ts): it works for both, never
 * lazily unless asked, and says "busy" in words a person understands.
 */
import { spawn } from 'node:child_process';
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { BlockError, InvalidArgumentError } from '../../block/errors.js';
import * as native from '../../native/index.js';
import { Errno } from '../errno.js';
import { log } from '../log.js';

export interface KernelMountOptions {
  /** The source column of the mount table (the image's path). */
  fsname: string;
  /** `fuse.<subtype>` is the file-system type. */
  subtype: string;
  readOnly: boolean;
  allowOther: boolean;
}

/** Mounts at `mountpoint` and returns the /dev/fuse fd of the new connection (non-blocking). */
export async function mountKernel(mountpoint: string, options: KernelMountOptions): Promise<number> {
  return process.getuid?.() === 0 ? mountAsRoot(mountpoint, options) : mountWithFusermount(mountpoint, options);
}

function mountAsRoot(mountpoint: string, options: KernelMountOptions): number {
  const fd = openSync('/dev/fuse', fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
  const data = [`fd=${fd}`, 'rootmode=40000', `user_id=${process.getuid?.() ?? 0}`, `group_id=${process.getgid?.() ?? 0}`, 'default_permissions'];
  if (options.allowOther) data.push('allow_other');
  const flags = native.constants.MS_NOSUID | native.constants.MS_NODEV | (options.readOnly ? native.constants.MS_RDONLY : 0);
  try {
    native.mount(options.fsname, mountpoint, `fuse.${options.subtype}`, flags, data.join(','));
  } catch (error) {
    closeSync(fd);
    throw new InvalidArgumentError(`cannot mount on ${mountpoint}: ${(error as Error).message}`);
  }
  log('mounted %s with mount(2): %s', mountpoint, data.join(','));
  return fd;
}

/** fusermount3 -o OPTIONS MOUNTPOINT with _FUSE_COMMFD; it hands the fd back over the socket. */
async function mountWithFusermount(mountpoint: string, options: KernelMountOptions): Promise<number> {
  const [ours, theirs] = native.socketpair();
  const mountOptions = [`fsname=${options.fsname}`, `subtype=${options.subtype}`, 'default_permissions'];
  if (options.allowOther) mountOptions.push('allow_other');
  if (options.readOnly) mountOptions.push('ro');
  // Close each end exactly once: a number closed twice may by then be the received fd.
  let theirsOpen = true;
  const closeTheirs = (): void => {
    if (theirsOpen) closeSync(theirs);
    theirsOpen = false;
  };
  try {
    const stderr = await runFusermount(['-o', mountOptions.join(','), '--', mountpoint], theirs);
    closeTheirs();
    let fd: number;
    try {
      fd = native.recvFd(ours);
    } catch (error) {
      throw new BlockError(`fusermount3 mounted ${mountpoint} but sent no /dev/fuse descriptor (${(error as Error).message}) ${stderr}`.trim(), Errno.EIO);
    }
    native.setNonblocking(fd, true);
    log('mounted %s with fusermount3: %s', mountpoint, mountOptions.join(','));
    return fd;
  } finally {
    closeTheirs();
    closeSync(ours);
  }
}

function runFusermount(args: readonly string[], commFd: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('fusermount3', args, {
      stdio: ['ignore', 'ignore', 'pipe', commFd],
      env: { ...process.env, _FUSE_COMMFD: '3' },
    });
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    child.on('error', (error: NodeJS.ErrnoException) => {
      reject(
        error.code === 'ENOENT'
          ? new BlockError('fusermount3 is not installed (Debian package fuse3); an ordinary user needs it to mount', Errno.ENOENT)
          : error,
      );
    });
    child.on('close', (code) => {
      if (code === 0) resolve(stderr.trim());
      else reject(new InvalidArgumentError(`cannot mount on ${args[args.length - 1]}: ${stderr.trim().replace(/^fusermount3: /, '') || `fusermount3 exited ${code}`}`));
    });
  });
}
