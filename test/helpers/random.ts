/**
 * A small seeded pseudo-random generator (mulberry32) so randomized tests
 * replay exactly: a failure message names the seed.
 */
export function seededRandom(seed: number): { int(min: number, max: number): number; fill(buffer: Buffer): void } {
  let state = seed >>> 0;
  const next = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    /** An integer in [min, max]. */
    int: (min, max) => min + Math.floor(next() * (max - min + 1)),
    fill(buffer) {
      for (let i = 0; i < buffer.length; i += 4) {
        const value = Math.floor(next() * 4294967296);
        for (let j = 0; j < 4 && i + j < buffer.length; j++) buffer[i + j] = (value >>> (8 * j)) & 0xff;
      }
    },
  };
}
