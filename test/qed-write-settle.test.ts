/**
 * A QED write split into parts answers only once every part has finished:
 * when one part fails at once while another is still writing from the
 * caller's buffer, the request must not settle (and free the buffer for
 * reuse) before the slow part is done. Then it fails with the first error.
 */
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { createImage } from '../src/index.js';
import { makeTempDir, openQedOver, seededBytes, spyProtocol, type SpyProtocol } from './helpers/qemu.js';

const CLUSTER = 4096;

describe('QED writes split into parts', () => {
  it('settle only after every part has finished, even when one part fails fast', async () => {
    const dir = await makeTempDir();
    const path = join(dir, 'parts.qed');
    await createImage(path, 'qed', { size: 1024 * 1024, options: { cluster_size: String(CLUSTER), table_size: '1' } });
    // Guest cluster 1 first, then cluster 0: the two land in non-adjacent host clusters.
    const setup = await openQedOver(await spyProtocol(path, false));
    await setup.write(CLUSTER, seededBytes(1, CLUSTER));
    await setup.write(0, seededBytes(2, CLUSTER));
    const runs = await setup.map(0, 2 * CLUSTER);
    await setup.close();
    expect(runs.map((run) => run.data)).toEqual([true, true]);
    const [fastHost, slowHost] = [runs[0]!.hostOffset!, runs[1]!.hostOffset!];

    const spy = await spyProtocol(path, false);
    let slowDone = false;
    const protocol: SpyProtocol = {
      ...spy,
      async write(offset: number, buffer: Buffer) {
        if (offset === fastHost) throw Object.assign(new Error(`injected EIO at ${offset}`), { code: 'EIO' });
        if (offset === slowHost) {
          await delay(150);
          await spy.write(offset, buffer);
          slowDone = true;
          return;
        }
        return spy.write(offset, buffer);
      },
    };
    const image = await openQedOver(protocol);
    let slowDoneWhenSettled: boolean | undefined;
    const request = image.write(0, seededBytes(3, 2 * CLUSTER)).finally(() => (slowDoneWhenSettled = slowDone));
    await expect(request).rejects.toThrow(`injected EIO at ${fastHost}`);
    expect(slowDoneWhenSettled).toBe(true);
    await image.close();
  });
});
