import { UnsupportedFeatureError } from '../../block/errors.js';
import type { FormatDriver } from '../../block/types.js';

const QCOW_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

export const qcow2: FormatDriver = {
  name: 'qcow2',
  extensions: ['.qcow2', '.qcow'],
  probe: (sample) => (sample.head.subarray(0, 4).equals(QCOW_MAGIC) ? 100 : 0),
  async open(file) {
    throw new UnsupportedFeatureError(`${file.path}: qcow2 images are not supported yet`);
  },
};
