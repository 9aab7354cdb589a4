/**
 * The process of a background daemon (spawned by startDaemon in daemon.ts): waits
 * for its configuration on the IPC channel, reports notices, readiness or the
 * one-line reason it could not mount, hangs up once ready, and exits with the
 * daemon's status when the mount is gone.
 */
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
  let ready = false;
  runDaemon(message.config, {
    notice: (line) => void send({ type: 'notice', line }),
    ready: () => {
      ready = true;
      void send({ type: 'ready' }).then(() => process.connected && process.disconnect());
    },
  }).then(
    (status) => process.exit(status),
    async (error: unknown) => {
      log('cannot mount: %s', oneLine(error));
      if (!ready) await send({ type: 'error', message: oneLine(error) });
      process.exit(1);
    },
  );
});
