/**
 * The short version of the fio soak (scripts/soak.sh, docs/reliability.md):
 * 40 seconds of rounds on 64 MiB QED and qcow2 images over backing files, fio
 * writing with --verify through the mounts, and between rounds a clean unmount
 * by one of its routes or a kill -9 of the daemon (idle or mid-write); after
 * each, qemu-img check and a byte-exact comparison of the image with what was
 * acknowledged. The seed is new each run and printed first, so a failure can be
 * replayed with `scripts/soak.sh --seed S`. Needs fio as well as the FUSE tools.
 */
import { fileURLToPath } from 'node:url';
import { describe, expect, test } from 'vitest';
import { run } from '../helpers/qemu.js';
import { skipWithoutFuse } from './fuse-helpers.js';

const SOAK = fileURLToPath(new URL('../../scripts/soak.sh', import.meta.url));

describe.skipIf(skipWithoutFuse('fio soak', ['fio', 'fallocate', 'timeout']))('fio soak, short', () => {
  test('40 s of fio rounds with random unmounts and kill -9: every round passes', { timeout: 150_000 }, async () => {
    const result = await run(SOAK, ['--seconds', '40', '--size', '64']);
    const lines = result.stdout.trimEnd().split('\n');
    const last = lines[lines.length - 1] ?? '';
    expect(last, result.stdout + result.stderr).toMatch(/^[1-9]\d* rounds, 0 failed$/);
    expect(result.code, result.stdout + result.stderr).toBe(0);
  });
});
