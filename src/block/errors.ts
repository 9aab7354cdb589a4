/**
 * The error tree of the block layer. Every error a driver raises on purpose is
 * one of these; each carries the errno a FUSE request should answer with, so
 * the front end maps errors to `-errno` in exactly one place (src/fuse/errno.ts).
 * Messages are single lines a person can act on.
 */
import { constants as osConstants } from 'node:os';

const { errno } = osConstants;

/**
 * Base class: a block-layer error with the errno that describes it. Control
 * characters in the message (a damaged image's backing file name may hold a
 * newline) are shown escaped, so the message stays one line.
 */
export class BlockError extends Error {
  readonly errno: number;
  constructor(message: string, errnoValue: number) {
    super(oneLine(message));
    this.name = new.target.name;
    this.errno = errnoValue;
  }
}

/** The image's metadata breaks the format's rules (bad header field, table outside the file...). */
export class CorruptImageError extends BlockError {
  constructor(message: string) {
    super(message, errno.EIO);
  }
}

/** The image uses a feature this program does not implement (unknown feature bits...). */
export class UnsupportedFeatureError extends BlockError {
  constructor(message: string) {
    super(message, errno.ENOTSUP);
  }
}

/** A caller passed something invalid: an offset outside the image, a bad option, a bad size. */
export class InvalidArgumentError extends BlockError {
  constructor(message: string) {
    super(message, errno.EINVAL);
  }
}

/** A write was attempted on an image opened read-only. */
export class ReadOnlyError extends BlockError {
  constructor(message: string) {
    super(message, errno.EROFS);
  }
}

/** The host file system returned an error; keeps the host errno (ENOSPC, EIO...). */
export class HostIoError extends BlockError {
  constructor(message: string, errnoValue: number) {
    super(message, errnoValue);
  }
}

/** Turns a Node.js system error from fs into a HostIoError naming the file and operation. */
export function hostIoError(operation: string, path: string, cause: unknown): BlockError {
  if (cause instanceof BlockError) return cause;
  const code = (cause as NodeJS.ErrnoException | undefined)?.code;
  const value = code !== undefined && code in errno ? errno[code as keyof typeof errno] : errno.EIO;
  return new HostIoError(`${operation} ${path}: ${systemReason(cause)}`, value);
}

/**
 * The reason of a Node.js system error without Node's decoration: "no such file
 * or directory" rather than "ENOENT: no such file or directory, realpath '/x'".
 */
export function systemReason(cause: unknown): string {
  const message = cause instanceof Error ? cause.message : String(cause);
  const match = /^E[A-Z0-9]+: ([^,]+)(?:, .*)?$/.exec(message);
  return match ? match[1]! : message;
}

/** `message` with each control character written as \xNN. */
function oneLine(message: string): string {
  return message.replace(/[\u0000-\u001f\u007f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
