/**
 * A short run of scripts/power-loss.sh per format (the long runs are in
 * docs/reliability.md): the workloads write through the log-writes
 * filter, the replay rebuilds crash states and checks each with imgmount and
 * qemu-img. Uses dist/ (built by npm test / scripts/test.sh before vitest).
 */
import { describe, expect, it } from 'vitest';
import { run, skipWithoutQemu } from './helpers/qemu.js';

const SCRIPT = new URL('../scripts/power-loss.sh', import.meta.url).pathname;

describe.skipIf(skipWithoutQemu('power-loss'))('power-loss.sh', () => {
  for (const [format, states] of [['qed', 100], ['qcow2', 100]] as const) {
    it(`${format}: ${states} crash states, none failing`, { timeout: 240_000 }, async () => {
      const result = await run(SCRIPT, [format, String(states)], { cwd: '/' });
      const lines = `${result.stdout}${result.stderr}`.trimEnd().split('\n');
      const last = lines.at(-1) ?? '';
      const match = /^(\d+) states checked, (\d+) failed$/.exec(last);
      expect(match, lines.join('\n')).not.toBeNull();
      expect(Number(match![2]), lines.join('\n')).toBe(0);
      expect(Number(match![1])).toBeGreaterThanOrEqual(states);
      expect(result.code).toBe(0);
    });
  }
});
