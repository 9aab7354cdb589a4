/**
 * The process of a background daemon (spawned by startDaemon in
 * src/cli/background.ts as `node daemon-entry.js MOUNTPOINT TITLE`): waits for
 * its configuration on the IPC channel, takes its process title (`imgmount
 * disk.qed on /mnt/x`, which the command line was made long enough to hold),
 * reports notices, readiness or the one-line reason it could not mount, hangs up
 * once ready, and exits with the daemon's status when the mount is gone.
 */
import { daemonTitle } from '../cli/background.js';
import { oneLine, runDaemon, type FromDaemon, type ToDaemon } from './daemon.js';
import { log } from './log.js';

function send(message: FromDaemon): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send || !process.connected) {
      resolve();
      return;
    }
    process.send(message, undefined, {}, () => resolve());
  });
}

process.once('message', (message: ToDaemon) => {
  process.title = daemonTitle(message.config);
  let ready = false;
  runDaemon(message.config, {
    notice: (line) => void send({ type: 'notice', line }),
    ready: () => {
      ready = true;
      void send({ type: 'ready' }).then(() => process.connected && process.disconnect());
    },
  }).then(
    async (status) => {
      // For the tests only: a daemon slow to exit after closing its images, to show
      // that `imgmount unmount` waits for the process to end, not only for the images.
      const delayMs = Number(process.env.IMGMOUNT_TEST_EXIT_DELAY_MS ?? 0);
      if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
      process.exit(status);
    },
    async (error: unknown) => {
      log('cannot mount: %s', oneLine(error));
      if (!ready) await send({ type: 'error', message: oneLine(error) });
      process.exit(1);
    },
  );
});
