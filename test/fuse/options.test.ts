/**
 * The pure parts of a mount: `-o` parsing, file names, the kernel mount options,
 * combining the command line into a plan, and reading /proc/self/mountinfo.
 */
import { describe, expect, test } from 'vitest';
import { mountPlan } from '../../src/cli/mount.js';
import { parseMountInfo } from '../../src/fuse/mountinfo.js';
import { kernelMountOptions, mountFileNames, parseMountOptions, rawFileName, type MountConfig } from '../../src/fuse/options.js';

describe('-o mount options', () => {
  test('flags and values, repeatable, later items win', () => {
    expect(parseMountOptions(['ro,allow_other', 'format=qed,name=x.raw', 'log=/tmp/l,debug,foreground,nonempty'])).toEqual({
      readOnly: true,
      allowOther: true,
      format: 'qed',
      name: 'x.raw',
      logFile: '/tmp/l',
      debug: true,
      foreground: true,
      nonempty: true,
    });
    expect(parseMountOptions(['ro', 'rw'])).toEqual({ readOnly: false });
    expect(parseMountOptions(['defaults, read-only ,,allow-other'])).toEqual({ readOnly: true, allowOther: true });
    expect(parseMountOptions([])).toEqual({});
  });

  test('unknown options and missing values are refused by name', () => {
    expect(() => parseMountOptions(['ro,big_writes'])).toThrow(/unknown mount option 'big_writes' \(known: ro, /);
    expect(() => parseMountOptions(['format='])).toThrow(/mount option 'format' needs a value/);
    expect(() => parseMountOptions(['size=1G'])).toThrow(/unknown mount option 'size=1G'/);
  });
});

describe('file names in the mount', () => {
  test('the extension becomes .raw', () => {
    expect(rawFileName('/a/b/disk.qed')).toBe('disk.raw');
    expect(rawFileName('disk.img')).toBe('disk.raw');
    expect(rawFileName('disk')).toBe('disk.raw');
    expect(rawFileName('disk.raw')).toBe('disk.raw');
    expect(rawFileName('my.disk.qed')).toBe('my.disk.raw');
    expect(rawFileName('.hidden')).toBe('.hidden.raw');
  });

  test('--name for one image; clashes and bad names are refused', () => {
    expect(mountFileNames(['/x/a.qed', '/y/b.qed'], undefined)).toEqual(['a.raw', 'b.raw']);
    expect(mountFileNames(['/x/a.qed'], 'guest.bin')).toEqual(['guest.bin']);
    expect(() => mountFileNames(['/x/a.qed', '/y/a.img'], undefined)).toThrow('/x/a.qed and /y/a.img would both appear as a.raw');
    expect(() => mountFileNames(['/x/a.qed', '/y/b.qed'], 'c')).toThrow(/single image, but 2 images/);
    expect(() => mountFileNames([], undefined)).toThrow(/no image given/);
    for (const bad of ['', '.', '..', 'a/b', 'x'.repeat(256)]) expect(() => mountFileNames(['/a.qed'], bad)).toThrow();
  });
});

describe('kernel mount options', () => {
  const base: MountConfig = { images: ['/images/disk.qed'], mountpoint: '/mnt', readOnly: false, allowOther: false, debug: false, nonempty: false };

  test('our subtype, the image as source, read-only and allow_other as configured', () => {
    expect(kernelMountOptions(base)).toEqual({ fsname: '/images/disk.qed', subtype: 'imgmount', readOnly: false, allowOther: false });
    expect(kernelMountOptions({ ...base, readOnly: true, allowOther: true })).toMatchObject({ readOnly: true, allowOther: true });
  });

  test('an image path fusermount would misread is not used as the source', () => {
    expect(kernelMountOptions({ ...base, images: ['/images/a,b.qed'] }).fsname).toBe('imgmount');
    expect(kernelMountOptions({ ...base, images: ['/images/a b.qed'] }).fsname).toBe('imgmount');
    expect(kernelMountOptions({ ...base, images: [`/${'x'.repeat(2000)}.qed`] }).fsname).toBe('imgmount');
  });
});

describe('the mount plan from the command line', () => {
  test('paths are resolved; the last one is the mount point', () => {
    const { config, foreground } = mountPlan({ paths: ['a.qed', '/abs/b.img', 'mnt'] }, '/work');
    expect(config).toEqual({
      images: ['/work/a.qed', '/abs/b.img'],
      mountpoint: '/work/mnt',
      format: undefined,
      readOnly: false,
      allowOther: false,
      name: undefined,
      debug: false,
      logFile: undefined,
      nonempty: false,
    });
    expect(foreground).toBe(false);
  });

  test('long options and -o combine', () => {
    const { config } = mountPlan({ paths: ['a.qed', 'mnt'], readOnly: false, options: ['ro,allow_other,log=x.log'], format: 'qed' }, '/w');
    expect(config).toMatchObject({ readOnly: true, allowOther: true, logFile: '/w/x.log', format: 'qed' });
    expect(() => mountPlan({ paths: ['a', 'm'], name: 'x', options: ['name=y'] })).toThrow('--name x and -o name=y disagree');
  });

  test('-d implies --foreground unless there is a log file', () => {
    expect(mountPlan({ paths: ['a', 'm'], debug: true }).foreground).toBe(true);
    expect(mountPlan({ paths: ['a', 'm'], debug: true, log: 'l' }).foreground).toBe(false);
    expect(mountPlan({ paths: ['a', 'm'], options: ['debug'] }).foreground).toBe(true);
    expect(mountPlan({ paths: ['a', 'm'], options: ['foreground'] }).foreground).toBe(true);
  });

  test('the L2 cache size comes from --cache-size or -o cache_size, with size suffixes', () => {
    expect(mountPlan({ paths: ['a', 'm'] }).config.cacheBytes).toBeUndefined();
    expect(mountPlan({ paths: ['a', 'm'], cacheSize: '64M' }).config.cacheBytes).toBe(64 * 1024 * 1024);
    expect(mountPlan({ paths: ['a', 'm'], options: ['cache_size=1G'] }).config.cacheBytes).toBe(1024 ** 3);
    expect(() => mountPlan({ paths: ['a', 'm'], cacheSize: 'lots' })).toThrow("invalid cache size 'lots'");
  });

  test('busy polling comes from --busy-poll or -o busy_poll, whole microseconds up to 1000', () => {
    expect(mountPlan({ paths: ['a', 'm'] }).config.busyPollUs).toBeUndefined();
    expect(mountPlan({ paths: ['a', 'm'], busyPoll: '0' }).config.busyPollUs).toBe(0);
    expect(mountPlan({ paths: ['a', 'm'], options: ['busy_poll=200'] }).config.busyPollUs).toBe(200);
    for (const bad of ['-1', '1001', '2.5', 'fast', '']) {
      expect(() => mountPlan({ paths: ['a', 'm'], busyPoll: bad }), bad).toThrow(`invalid --busy-poll '${bad}': expected whole microseconds from 0 to 1000`);
    }
    expect(() => mountPlan({ paths: ['a', 'm'], busyPoll: '10', options: ['busy_poll=20'] })).toThrow('--busy-poll 10 and -o busy_poll=20 disagree');
  });

  test('one path is not enough', () => {
    expect(() => mountPlan({ paths: ['mnt'] })).toThrow(/give at least one IMAGE and the MOUNTPOINT/);
  });
});

describe('/proc/self/mountinfo', () => {
  test('fields, optional fields and octal escapes', () => {
    const text = [
      '22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw',
      '42 27 0:39 / /tmp/with\\040space rw,nosuid,nodev,relatime - fuse.imgmount /images/a\\040b.qed rw,user_id=0,group_id=0',
      'garbage',
      '',
    ].join('\n');
    expect(parseMountInfo(text)).toEqual([
      { id: 22, device: '0:21', mountpoint: '/proc', type: 'proc', source: 'proc' },
      { id: 42, device: '0:39', mountpoint: '/tmp/with space', type: 'fuse.imgmount', source: '/images/a b.qed' },
    ]);
  });
});
