/**
 * The containment harness of the damaged-image fuzz tests: runs library calls
 * on an image and insists that each one either succeeds or fails with a
 * BlockError whose message is one line, within a time budget and a memory
 * budget, with no unhandled rejection.
 *
 * - Time: every call races a timer for what is left of the case's budget
 *   (an asynchronous hang); the case's elapsed time is also checked after each
 *   call (slow synchronous work). A synchronous endless loop never yields to
 *   either, so a watchdog thread kills the process after a hard limit,
 *   printing the case it was running.
 * - Memory: Buffer.alloc / allocUnsafe / allocUnsafeSlow of more than the
 *   budget throw AllocationBudgetError (not a BlockError, so the case fails and
 *   the process is spared), and the RSS is sampled during the case: its growth
 *   must stay under the budget (typed arrays and other allocations).
 * - Unhandled rejections are recorded and fail the case they happen in.
 */
import { writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { BlockError } from '../../src/index.js';

export class AllocationBudgetError extends Error {}

export interface Budget {
  /** Milliseconds a case may spend in library calls. */
  caseMs: number;
  /** Bytes the RSS may grow during a case, and the largest single Buffer allocation. */
  memoryBytes: number;
  /** Milliseconds of a blocked event loop after which the watchdog kills the process. */
  watchdogMs: number;
}

/** What one call did: `ok`, or the error's class name. */
export type Outcome = 'ok' | string;

interface Guard {
  restore(): void;
  unhandled: unknown[];
}

/** Installs the allocation limit and the unhandled-rejection recorder; `restore` removes both. */
export function installGuards(budget: Budget): Guard {
  const originals = { alloc: Buffer.alloc, allocUnsafe: Buffer.allocUnsafe, allocUnsafeSlow: Buffer.allocUnsafeSlow };
  const limit = (name: keyof typeof originals) =>
    function (this: unknown, size: number, ...rest: unknown[]) {
      if (size > budget.memoryBytes) {
        throw new AllocationBudgetError(`Buffer.${name}(${size}): above the fuzz memory budget of ${budget.memoryBytes} bytes`);
      }
      return (originals[name] as (...args: unknown[]) => Buffer).call(Buffer, size, ...rest);
    };
  Buffer.alloc = limit('alloc') as typeof Buffer.alloc;
  Buffer.allocUnsafe = limit('allocUnsafe') as typeof Buffer.allocUnsafe;
  Buffer.allocUnsafeSlow = limit('allocUnsafeSlow') as typeof Buffer.allocUnsafeSlow;
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  return {
    unhandled,
    restore() {
      Object.assign(Buffer, originals);
      process.off('unhandledRejection', onUnhandled);
    },
  };
}

/** A watchdog thread: kills the process when one case keeps the event loop blocked past the limit. */
export class Watchdog {
  private readonly shared = new SharedArrayBuffer(8 + 4 + 4096);
  private readonly started = new Float64Array(this.shared, 0, 1);
  private readonly textLength = new Int32Array(this.shared, 8, 1);
  private readonly text = new Uint8Array(this.shared, 12, 4096);
  private readonly worker: Worker;

  constructor(limitMs: number) {
    this.worker = new Worker(
      `const { workerData } = require('node:worker_threads');
       const { writeSync } = require('node:fs');
       const started = new Float64Array(workerData.shared, 0, 1);
       const length = new Int32Array(workerData.shared, 8, 1);
       const text = new Uint8Array(workerData.shared, 12, 4096);
       setInterval(() => {
         const at = started[0];
         if (at > 0 && Date.now() - at > workerData.limitMs) {
           const name = Buffer.from(text.slice(0, length[0])).toString('utf8');
           writeSync(2, '\\nfuzz watchdog: the event loop was blocked for over ' + workerData.limitMs + ' ms in case:\\n' + name + '\\n');
           process.kill(process.pid, 'SIGKILL');
         }
       }, 250);`,
      { eval: true, workerData: { shared: this.shared, limitMs } },
    );
    this.worker.unref();
  }

  begin(description: string): void {
    const bytes = Buffer.from(description.slice(0, 1000), 'utf8').subarray(0, 4096);
    this.text.set(bytes);
    this.textLength[0] = bytes.length;
    this.started[0] = Date.now();
  }

  end(): void {
    this.started[0] = 0;
  }

  async stop(): Promise<void> {
    await this.worker.terminate();
  }
}

/** One case's budget keeper: runs calls, classifies their outcomes, and fails the case on anything uncontained. */
export class CaseRunner {
  private spentMs = 0;
  private active = 0;
  private activeSince = 0;
  private peakRss = 0;
  private readonly baseRss = process.memoryUsage.rss();
  private readonly sampler: NodeJS.Timeout;
  readonly outcomes: Array<[step: string, outcome: Outcome]> = [];

  constructor(
    private readonly description: string,
    private readonly budget: Budget,
    private readonly guard: Guard,
  ) {
    this.sampler = setInterval(() => this.sample(), 10);
    this.sampler.unref();
  }

  private sample(): void {
    this.peakRss = Math.max(this.peakRss, process.memoryUsage.rss());
  }

  /**
   * Runs `call`, which may succeed or fail with a contained error; returns its
   * value, or undefined when it failed. Anything else fails the case.
   */
  async run<T>(step: string, call: () => Promise<T>): Promise<{ value?: T; outcome: Outcome }> {
    const left = this.budget.caseMs - this.spent();
    if (left <= 0) this.fail(step, `the case ran out of its ${this.budget.caseMs} ms budget before this step`);
    if (this.active++ === 0) this.activeSince = performance.now();
    const start = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), left);
    });
    let result: { value?: T; outcome: Outcome };
    try {
      const settled = await Promise.race([call().then((value) => ({ value })), timeout]);
      if (settled === 'timeout') this.fail(step, `did not finish within the ${this.budget.caseMs} ms budget of the case (a hang?)`);
      result = { value: (settled as { value: T }).value, outcome: 'ok' };
    } catch (error) {
      if (error instanceof CaseFailure) throw error;
      result = { outcome: this.classify(step, error) };
    } finally {
      clearTimeout(timer);
      if (--this.active === 0) this.spentMs += performance.now() - this.activeSince;
    }
    const took = performance.now() - start;
    if (process.env.FUZZ_DEBUG && took > Number(process.env.FUZZ_DEBUG)) progressLine(`  slow step "${step}": ${Math.round(took)} ms (${result.outcome})`);
    if (this.spent() > this.budget.caseMs) this.fail(step, `the case took ${Math.round(this.spent())} ms, over its ${this.budget.caseMs} ms budget`);
    this.sample();
    const grown = this.peakRss - this.baseRss;
    if (grown > this.budget.memoryBytes) this.fail(step, `the RSS grew by ${grown} bytes, over the ${this.budget.memoryBytes}-byte budget`);
    if (this.guard.unhandled.length > 0) {
      const reason = this.guard.unhandled.splice(0);
      this.fail(step, `unhandled rejection: ${describeError(reason[0])}`);
    }
    this.outcomes.push([step, result.outcome]);
    return result;
  }

  /** Wall-clock milliseconds spent inside calls so far (overlapping calls count once). */
  get elapsedMs(): number {
    return this.spent();
  }

  private spent(): number {
    return this.spentMs + (this.active > 0 ? performance.now() - this.activeSince : 0);
  }

  private classify(step: string, error: unknown): Outcome {
    if (!(error instanceof BlockError)) this.fail(step, `threw something other than a BlockError: ${describeError(error)}`);
    const blockError = error as BlockError;
    if (blockError.message.length === 0 || /[\r\n]/.test(blockError.message)) {
      this.fail(step, `${blockError.name} message is not one non-empty line: ${JSON.stringify(blockError.message)}`);
    }
    if (!Number.isInteger(blockError.errno) || blockError.errno <= 0) this.fail(step, `${blockError.name} has errno ${blockError.errno}`);
    return blockError.name;
  }

  /** Fails the case, naming it, the step and what went wrong. */
  fail(step: string, problem: string): never {
    throw new CaseFailure(`${this.description}\n  step "${step}": ${problem}`);
  }

  finish(): void {
    clearInterval(this.sampler);
  }
}

/** A case that broke containment; its message names the case. */
export class CaseFailure extends Error {}

function describeError(error: unknown): string {
  if (error instanceof Error) return `${error.constructor.name}: ${error.message}\n${error.stack ?? ''}`;
  return String(error);
}

/** Writes a line to stderr at once (progress of long local runs), bypassing console buffering. */
export function progressLine(line: string): void {
  writeSync(2, `${line}\n`);
}
