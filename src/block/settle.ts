/**
 * Waiting for every part of a request. `Promise.all` rejects as soon as one
 * part fails while the others may still be reading into (or writing from) the
 * request's buffer; a request must be answered, and a file closed, only after
 * every part has finished. `settleAll` waits for all of them, then throws the
 * first failure.
 */
export async function settleAll(parts: Iterable<Promise<unknown> | undefined>): Promise<void> {
  const results = await Promise.allSettled(parts);
  for (const result of results) if (result.status === 'rejected') throw result.reason;
}
