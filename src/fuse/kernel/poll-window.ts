/**
 * How long the connection keeps reading /dev/fuse after it has answered its
 * last request, before it goes back to sleep in the event loop: adaptive
 * busy polling, after QEMU's event-loop polling (its poll-max-ns, poll-grow,
 * poll-shrink).
 *
 * Why. At queue depth 1 a request waits for the daemon to be woken (an
 * interrupt to the other CPU, a context switch) and the daemon sleeps again
 * after each reply; that round trip cost more than the request's own work.
 * Reading on for a few microseconds after a reply catches the next request
 * while the daemon is still running.
 *
 * The policy. The window starts at 0. When a request arrives after the
 * daemon went idle, the wait it took decides: caught within the window, the
 * window stays; later, but within the maximum, the window grows (doubles, to
 * the maximum), since a longer spin would have caught it; later than the
 * maximum, the window halves (and soon reaches 0), so a mount that sees a
 * request now and then does not spin at all, and an idle one never does.
 *
 * Concurrency: owned by one connection, used on the main thread only.
 */

/** Smallest window once polling starts to grow, in microseconds. */
const FIRST_WINDOW_US = 4;

export class PollWindow {
  /** Current window, in microseconds. */
  private windowUs = 0;
  /** When the daemon went idle (performance.now(), ms); undefined while requests are being answered. */
  private idleSince: number | undefined;

  constructor(readonly maxUs: number) {}

  /** Microseconds to keep reading now that the daemon is idle (0: sleep at once). */
  beginIdle(now: number): number {
    this.idleSince = now;
    return this.windowUs;
  }

  /** A request arrived; `now` as for beginIdle. */
  arrived(now: number): void {
    if (this.idleSince === undefined) return;
    const waitedUs = (now - this.idleSince) * 1000;
    this.idleSince = undefined;
    if (waitedUs <= this.windowUs) return;
    if (waitedUs > this.maxUs) this.windowUs = this.windowUs < FIRST_WINDOW_US ? 0 : this.windowUs / 2;
    else this.windowUs = Math.min(this.maxUs, Math.max(FIRST_WINDOW_US, this.windowUs * 2));
  }

  /** The current window, for logs and tests. */
  get currentUs(): number {
    return this.windowUs;
  }
}
