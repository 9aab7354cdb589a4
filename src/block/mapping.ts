/**
 * Building a driver's map() answer: runs are appended in guest order, and a
 * run that continues the previous one the same way is joined to it, so a
 * caller sees one run per stretch of same storage. Pure function, no state.
 */
import { announce } from './events.js';
import { settleAll } from './settle.js';
import type { Mapping, Protocol } from './types.js';

/**
 * Appends `run` to `runs`, joining it to the last run when both are of the same
 * kind, contiguous in the guest, and either both without a host offset or both
 * in the same file at contiguous host offsets. Encoded runs are never joined:
 * each names its own encoded cluster.
 */
export function appendRun(runs: Mapping[], run: Mapping): void {
  const last = runs[runs.length - 1];
  if (last && last.kind === run.kind && run.kind !== 'encoded' && last.kind !== 'encoded' && last.guestOffset + last.length === run.guestOffset) {
    const lastHost = last.hostOffset;
    const runHost = run.hostOffset;
    const sameStorage = lastHost === undefined ? runHost === undefined : runHost !== undefined && last.file === run.file && lastHost + last.length === runHost;
    if (sameStorage) {
      last.length += run.length;
      return;
    }
  }
  runs.push(run);
}

/**
 * Writes `data` (at guest `offset`) by the runs a driver's map() gave for that range: a
 * `data` run in place in `file`, any other through `allocate`. Resolves once every part has
 * settled (the caller's buffer is then free), rejecting with the first failure.
 */
export function writeByRuns(file: Protocol, runs: readonly Mapping[], offset: number, data: Buffer, allocate: (guestOffset: number, part: Buffer) => Promise<void>): Promise<void> {
  return settleAll(
    runs.map((run) => {
      const part = data.subarray(run.guestOffset - offset, run.guestOffset - offset + run.length);
      if (run.kind === 'data') {
        announce(run.file ?? file, 'write_aio');
        return (run.file ?? file).write(run.hostOffset, part);
      }
      return allocate(run.guestOffset, part);
    }),
  );
}
