/**
 * The error a refused open (or read) gives: the test fails if the promise
 * resolves, or if what it rejects with is not a BlockError (a crash, a TypeError).
 */
import { expect } from 'vitest';
import { BlockError, openImage } from '../../src/index.js';

/** The BlockError `promise` rejects with. */
export async function refusal(promise: Promise<unknown>): Promise<BlockError> {
  const error = await promise.then(
    () => {
      throw new Error('opened (or read), but should have been refused');
    },
    (caught: unknown) => caught,
  );
  expect(error).toBeInstanceOf(BlockError);
  return error as BlockError;
}

/** The BlockError opening `path` as `format` gives (an image that opens is closed, and the test fails). */
export function openRefusal(path: string, format: string): Promise<BlockError> {
  return refusal(
    openImage(path, { format }).then(async (image) => {
      await image.close();
      throw new Error(`${path} opened, but should have been refused`);
    }),
  );
}
