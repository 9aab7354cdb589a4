/**
 * The one place where a failure becomes the `-errno` a FUSE request answers with.
 *
 *   BlockError (and its subclasses)  -> its errno (EIO corrupt, ENOTSUP, EINVAL, EROFS, ENOSPC...)
 *   Node.js system error (err.code)  -> that code's errno (ENOSPC, EIO, EACCES...)
 *   anything else                    -> logged with its stack, EIO
 *
 * Every failed request is logged on imgmount:daemon with the request it answered,
 * so a daemon's log explains each error an application saw.
 */
import { constants } from 'node:os';
import { BlockError } from '../block/errors.js';
import { log } from './log.js';

/** errno values by name (os.constants.errno). */
export const Errno = constants.errno;

/** A refusal decided by the FUSE layer itself (resize, write past the end...). */
export function refusal(message: string, errno: number): BlockError {
  return new BlockError(message, errno);
}

/** Maps any thrown value to a negative errno for the reply to `request`. */
export function toFuseError(error: unknown, request: string): number {
  if (error instanceof BlockError && isErrno(error.errno)) {
    log('%s: %s', request, error.message);
    return -error.errno;
  }
  const code = (error as NodeJS.ErrnoException | null | undefined)?.code;
  if (typeof code === 'string' && Object.hasOwn(Errno, code)) {
    log('%s: %s', request, (error as Error).message);
    return -Errno[code as keyof typeof Errno];
  }
  log('%s: unexpected error, answering EIO: %O', request, error);
  return -Errno.EIO;
}

function isErrno(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value > 0 && value < 4096;
}
