/**
 * How the command line reports failures: one line on stderr, no stack trace
 * for expected errors (BlockError), and the exit code the command chose.
 */
import { createRequire } from 'node:module';
import type createDebug from 'debug';
import { BlockError } from '../block/errors.js';

// The debug package loads (synchronously: it is CommonJS) only for an unexpected error,
// not at the start of every command.
let log: createDebug.Debugger | undefined;
function debugLog(): createDebug.Debugger {
  log ??= (createRequire(import.meta.url)('debug') as typeof createDebug)('imgmount:cli');
  return log;
}

/** An error that ends the command with a specific exit code. */
export class ExitError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
  }
}

/** One line describing `error` for a person. */
export function describeError(error: unknown): string {
  if (error instanceof BlockError || error instanceof ExitError) return error.message;
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (error instanceof Error && code !== undefined) return error.message;
  debugLog()('unexpected error: %O', error);
  const message = error instanceof Error ? error.message : String(error);
  return `unexpected error: ${message} (run with DEBUG=imgmount:* for details)`;
}

/** Prints the error as one line and sets the exit code (1 unless the error names one). */
export function reportError(error: unknown): void {
  process.stderr.write(`imgmount: ${describeError(error).replace(/\s*\n\s*/g, ' ')}\n`);
  process.exitCode = error instanceof ExitError ? error.exitCode : 1;
}
