/**
 * The busy-poll policy (src/fuse/kernel/poll-window.ts): requests that come
 * soon after each reply make the window grow until it catches them; a mount
 * that sees a request now and then, or none, never spins.
 */
import { describe, expect, test } from 'vitest';
import { PollWindow } from '../../src/fuse/kernel/poll-window.js';

/** Feeds `rounds` idle periods of `gapUs` each; returns the windows offered. */
function feed(window: PollWindow, gapUs: number, rounds: number, start = 0): { windows: number[]; end: number } {
  const windows: number[] = [];
  let now = start;
  for (let round = 0; round < rounds; round++) {
    windows.push(window.beginIdle(now));
    now += gapUs / 1000;
    window.arrived(now);
    now += 0.01; // the request's own work
  }
  return { windows, end: now };
}

describe('busy-poll window', () => {
  test('requests 20 µs apart: the window grows to catch them and stays', () => {
    const window = new PollWindow(50);
    const { windows } = feed(window, 20, 10);
    expect(windows[0]).toBe(0);
    expect(windows.slice(-4).every((us) => us >= 20 && us <= 50)).toBe(true);
  });

  test('never beyond the maximum; 0 means never', () => {
    const capped = new PollWindow(10);
    expect(Math.max(...feed(capped, 9.5, 20).windows)).toBeLessThanOrEqual(10);
    const off = new PollWindow(0);
    expect(feed(off, 5, 20).windows.every((us) => us === 0)).toBe(true);
  });

  test('requests milliseconds apart: no spinning at all', () => {
    const window = new PollWindow(50);
    expect(feed(window, 5000, 20).windows.every((us) => us === 0)).toBe(true);
  });

  test('after a busy stretch, a quiet one brings the window back to 0 within a few requests', () => {
    const window = new PollWindow(50);
    const busy = feed(window, 20, 10);
    expect(window.currentUs).toBeGreaterThan(0);
    const quiet = feed(window, 10_000, 8, busy.end);
    expect(quiet.windows[quiet.windows.length - 1]).toBe(0);
  });
});
