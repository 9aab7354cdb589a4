/**
 * One writer per image: a read-write open takes a lock named after the image's
 * real path, so a second imgmount (another mount, `check -r` on a mounted image)
 * cannot write the same image at the same time and corrupt it.
 *
 * The lock is a Linux abstract Unix socket (`\0imgmount-lock:<hash of the path>`):
 * binding it fails with EADDRINUSE while another process (or this one) holds it,
 * and the kernel releases it when the holder exits, even on SIGKILL, so a crash
 * never leaves a stale lock behind. It guards against imgmount processes only;
 * qemu's own locks (OFD byte locks) are not visible to Node.js.
 */
import { createHash } from 'node:crypto';
import { createServer, type Server } from 'node:net';
import { constants as osConstants } from 'node:os';
import { BlockError } from './errors.js';

export interface ImageLock {
  release(): Promise<void>;
}

/** Takes the write lock of the image at `realPath` (already resolved), or fails with EBUSY. */
export async function lockForWriting(realPath: string, displayPath: string): Promise<ImageLock> {
  const name = `\0imgmount-lock:${createHash('sha256').update(realPath).digest('hex').slice(0, 40)}`;
  const server: Server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(name, () => {
      server.off('error', reject);
      resolve();
    });
  }).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'EADDRINUSE') {
      throw new BlockError(
        `${displayPath} is already open for writing by an imgmount process (a mount or a check -r); unmount it first or open it read-only`,
        osConstants.errno.EBUSY,
      );
    }
    throw error;
  });
  server.unref();
  let released = false;
  return {
    release: () =>
      new Promise<void>((resolve) => {
        if (released) return resolve();
        released = true;
        server.close(() => resolve());
      }),
  };
}
