/**
 * Logging for the FUSE daemon, through the `debug` package:
 *
 *   imgmount:fuse    every FUSE operation with its result and duration (-d/--debug)
 *   imgmount:daemon  lifecycle, notices and every failed request; always on in a daemon
 *
 * A background daemon's stderr is its --log file (or /dev/null), so these lines
 * land there; a foreground daemon writes them to stderr or, with --log, to the file.
 */
import { openSync, writeSync } from 'node:fs';
import { format } from 'node:util';
import createDebug from 'debug';

export const trace = createDebug('imgmount:fuse');
export const log = createDebug('imgmount:daemon');

/** Turns on the daemon's log, and with `everything` every imgmount namespace. */
export function enableDaemonLog(everything: boolean): void {
  const current = createDebug.disable();
  const wanted = [current, 'imgmount:daemon', everything ? 'imgmount:*' : ''].filter((namespace) => namespace !== '');
  createDebug.enable(wanted.join(','));
}

/** Sends every debug line of this process to `path` (appending) instead of stderr. */
export function logToFile(path: string): void {
  const fd = openSync(path, 'a', 0o600);
  if (createDebug.inspectOpts) createDebug.inspectOpts.colors = false;
  createDebug.log = (...args: unknown[]) => {
    // Instances made before this call may still colour their output (and then carry no date).
    const line = format(...args).replace(/\x1b\[[0-9;]*m/g, '').trimStart();
    writeSync(fd, /^\d{4}-\d\d-\d\dT/.test(line) ? `${line}\n` : `${new Date().toISOString()} ${line}\n`);
  };
}
