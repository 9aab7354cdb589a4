/*
 * imgmount's native addon: the few Linux system calls Node.js cannot make,
 * one small function each, for the FUSE transport spoken from TypeScript
 * (src/native/index.ts is the typed loader; read its top comment first).
 *
 * Rules kept by every function here:
 * - Each returns a number (socketpair: an array of two), and a failure comes
 *   back as a negative errno, never as a JavaScript exception or a crash.
 *   Arguments of the wrong type or out of range give -EINVAL.
 * - Everything runs on the JavaScript thread that calls it. All calls but the
 *   poll ones are synchronous system calls; the caller keeps its buffers alive
 *   and unmoved for the duration of the call (napi_get_buffer_info).
 * - EINTR is retried here; EAGAIN (== EWOULDBLOCK on Linux) is returned.
 * - Polls are uv_poll_t handles on the calling thread's event loop; their
 *   callbacks run on that thread through napi_make_callback, so promises
 *   settled in a callback run their continuations right after it.
 *
 * C11 and Node-API (node_api.h) only; NAPI_VERSION 8 (Node >= 12.22 / 14.17).
 */
#define _GNU_SOURCE /* preadv2, RWF_NOWAIT, F_OFD_*, fallocate, MSG_CMSG_CLOEXEC */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/fuse.h>

#include <node_api.h>
#include <uv.h>

#define MAX_ARGS 6
#define MAX_IOVECS 1024 /* IOV_MAX on Linux */
#define MAX_SAFE_INTEGER 9007199254740991.0 /* 2^53 - 1: offsets stay exact as doubles */

/* ---------- argument helpers: each returns 0 or -EINVAL ---------- */

typedef struct {
  napi_env env;
  size_t argc;
  napi_value argv[MAX_ARGS];
} args_t;

static int get_args(napi_env env, napi_callback_info info, args_t *a) {
  a->env = env;
  a->argc = MAX_ARGS;
  if (napi_get_cb_info(env, info, &a->argc, a->argv, NULL, NULL) != napi_ok) return -EINVAL;
  for (size_t i = a->argc; i < MAX_ARGS; i++) napi_get_undefined(env, &a->argv[i]);
  return 0;
}

/* An integral number in [min, max] (both within +-2^53). */
static int get_integer(const args_t *a, size_t i, double min, double max, int64_t *out) {
  double d;
  if (napi_get_value_double(a->env, a->argv[i], &d) != napi_ok) return -EINVAL;
  if (!(d >= min && d <= max)) return -EINVAL; /* also NaN and infinities */
  if ((double)(int64_t)d != d) return -EINVAL; /* not integral */
  *out = (int64_t)d;
  return 0;
}

static int get_fd(const args_t *a, size_t i, int *fd) {
  int64_t v;
  if (get_integer(a, i, 0, INT_MAX, &v) < 0) return -EINVAL;
  *fd = (int)v;
  return 0;
}

static int get_int(const args_t *a, size_t i, int *out) {
  int64_t v;
  if (get_integer(a, i, INT_MIN, INT_MAX, &v) < 0) return -EINVAL;
  *out = (int)v;
  return 0;
}

static int get_bool(const args_t *a, size_t i, bool *out) {
  return napi_get_value_bool(a->env, a->argv[i], out) == napi_ok ? 0 : -EINVAL;
}

static int get_buffer(napi_env env, napi_value v, char **data, size_t *length) {
  bool is;
  void *p = NULL;
  if (napi_is_buffer(env, v, &is) != napi_ok || !is) return -EINVAL;
  if (napi_get_buffer_info(env, v, &p, length) != napi_ok) return -EINVAL;
  *data = p;
  return 0;
}

/* buffer[offset, offset + length) of the Buffer argument i, checked against its size. */
static int get_buffer_range(const args_t *a, size_t i, char **data, size_t *length) {
  char *base;
  size_t size;
  int64_t offset, len;
  if (get_buffer(a->env, a->argv[i], &base, &size) < 0) return -EINVAL;
  if (get_integer(a, i + 1, 0, (double)size, &offset) < 0) return -EINVAL;
  if (get_integer(a, i + 2, 0, (double)size - (double)offset, &len) < 0) return -EINVAL;
  *data = base + offset;
  *length = (size_t)len;
  return 0;
}

/* A string without NUL bytes into buf[size]; null or undefined gives NULL when allowed. */
static int get_string(const args_t *a, size_t i, char *buf, size_t size, bool nullable, const char **out) {
  napi_valuetype type;
  size_t length, copied;
  if (napi_typeof(a->env, a->argv[i], &type) != napi_ok) return -EINVAL;
  if (nullable && (type == napi_null || type == napi_undefined)) {
    *out = NULL;
    return 0;
  }
  if (type != napi_string) return -EINVAL;
  if (napi_get_value_string_utf8(a->env, a->argv[i], NULL, 0, &length) != napi_ok) return -EINVAL;
  if (length >= size) return -ENAMETOOLONG;
  if (napi_get_value_string_utf8(a->env, a->argv[i], buf, size, &copied) != napi_ok) return -EINVAL;
  if (copied != length || strlen(buf) != length) return -EINVAL;
  *out = buf;
  return 0;
}

static napi_value number(napi_env env, int64_t value) {
  napi_value result;
  napi_create_int64(env, value, &result);
  return result;
}

/* Runs a system call expression, retrying EINTR; yields its result or -errno. */
#define SYSCALL(result, expr)                          \
  do {                                                 \
    do (result) = (expr);                              \
    while ((result) < 0 && errno == EINTR);            \
    if ((result) < 0) (result) = -errno;               \
  } while (0)

/* ---------- 1. polling an fd on the event loop ---------- */

/*
 * One poll: a uv_poll_t watching UV_READABLE, the JavaScript callback and an
 * async context for napi_make_callback. Polls live in a per-environment list
 * (each worker thread has its own loop and ids) and are found by id.
 */
typedef struct poll_s {
  uv_poll_t handle;
  napi_env env;
  napi_ref callback;
  napi_async_context context;
  int32_t id;
  struct poll_s *next;
} poll_t;

typedef struct {
  poll_t *polls;
  int32_t next_id;
  int closing; /* handles still closing at environment teardown */
  napi_async_cleanup_hook_handle cleanup;
} instance_t;

static instance_t *instance(napi_env env) {
  void *data = NULL;
  napi_get_instance_data(env, &data);
  return data;
}

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)events;
  poll_t *p = handle->data;
  napi_env env = p->env;
  napi_handle_scope scope;
  napi_value callback, recv, arg, ignored;
  if (p->callback == NULL) return;
  napi_open_handle_scope(env, &scope);
  napi_get_reference_value(env, p->callback, &callback);
  napi_get_global(env, &recv); /* napi_make_callback wants an object as `this` */
  napi_create_int32(env, status, &arg);
  if (callback != NULL && napi_make_callback(env, p->context, recv, callback, 1, &arg, &ignored) == napi_pending_exception) {
    napi_value error;
    napi_get_and_clear_last_exception(env, &error);
    napi_fatal_exception(env, error); /* an exception in a poll callback is an uncaught exception */
  }
  napi_close_handle_scope(env, scope);
}

static void on_closed(uv_handle_t *handle) {
  free(handle->data);
}

/* Forgets the JavaScript side of a poll and closes its handle (freed once closed). */
static void close_poll(poll_t *p, uv_close_cb closed) {
  uv_poll_stop(&p->handle);
  if (p->callback != NULL) napi_delete_reference(p->env, p->callback);
  p->callback = NULL;
  napi_async_destroy(p->env, p->context);
  uv_close((uv_handle_t *)&p->handle, closed);
}

static poll_t *find_poll(instance_t *inst, int32_t id, poll_t ***link) {
  for (poll_t **l = &inst->polls; *l != NULL; l = &(*l)->next) {
    if ((*l)->id == id) {
      if (link != NULL) *link = l;
      return *l;
    }
  }
  return NULL;
}

/* pollStart(fd, callback(status)) -> id > 0 | -errno. status < 0: the poll stopped on an error (UV_EBADF on POLLERR). */
static napi_value poll_start(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, rc;
  napi_valuetype type;
  napi_value name;
  uv_loop_t *loop;
  instance_t *inst = instance(env);
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0) return number(env, -EINVAL);
  if (napi_typeof(env, a.argv[1], &type) != napi_ok || type != napi_function) return number(env, -EINVAL);
  if (inst == NULL || napi_get_uv_event_loop(env, &loop) != napi_ok) return number(env, -EINVAL);
  poll_t *p = calloc(1, sizeof *p);
  if (p == NULL) return number(env, -ENOMEM);
  rc = uv_poll_init(loop, &p->handle, fd); /* also sets O_NONBLOCK on fd (documented by libuv) */
  if (rc < 0) {
    free(p);
    return number(env, rc); /* libuv errors are negative errnos on Unix */
  }
  p->handle.data = p;
  p->env = env;
  napi_create_string_utf8(env, "imgmount:poll", NAPI_AUTO_LENGTH, &name);
  if (napi_async_init(env, NULL, name, &p->context) != napi_ok ||
      napi_create_reference(env, a.argv[1], 1, &p->callback) != napi_ok) {
    uv_close((uv_handle_t *)&p->handle, on_closed);
    return number(env, -ENOMEM);
  }
  rc = uv_poll_start(&p->handle, UV_READABLE, on_readable);
  if (rc < 0) {
    close_poll(p, on_closed);
    return number(env, rc);
  }
  if (inst->next_id == INT32_MAX) inst->next_id = 0;
  p->id = ++inst->next_id;
  p->next = inst->polls;
  inst->polls = p;
  return number(env, p->id);
}

/* pollStop(id) -> 0 | -ENOENT. No callback runs after it returns. */
static napi_value poll_stop(napi_env env, napi_callback_info info) {
  args_t a;
  int id;
  poll_t **link;
  instance_t *inst = instance(env);
  if (get_args(env, info, &a) < 0 || get_int(&a, 0, &id) < 0 || inst == NULL) return number(env, -EINVAL);
  poll_t *p = find_poll(inst, id, &link);
  if (p == NULL) return number(env, -ENOENT);
  *link = p->next;
  close_poll(p, on_closed);
  return number(env, 0);
}

/* pollRef(id, ref) -> 0 | -ENOENT. An unref'd poll does not keep the process alive. */
static napi_value poll_ref(napi_env env, napi_callback_info info) {
  args_t a;
  int id;
  bool ref;
  instance_t *inst = instance(env);
  if (get_args(env, info, &a) < 0 || get_int(&a, 0, &id) < 0 || get_bool(&a, 1, &ref) < 0 || inst == NULL) return number(env, -EINVAL);
  poll_t *p = find_poll(inst, id, NULL);
  if (p == NULL) return number(env, -ENOENT);
  if (ref) uv_ref((uv_handle_t *)&p->handle);
  else uv_unref((uv_handle_t *)&p->handle);
  return number(env, 0);
}

/* ---------- 2. reading and writing fds ---------- */

/* readInto(fd, buffer, offset, length) -> bytes | -errno (-EAGAIN when a non-blocking fd has nothing). */
static napi_value read_into(napi_env env, napi_callback_info info) {
  args_t a;
  int fd;
  char *data;
  size_t length;
  ssize_t n;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_buffer_range(&a, 1, &data, &length) < 0) return number(env, -EINVAL);
  SYSCALL(n, read(fd, data, length));
  return number(env, n);
}

/* writev(fd, buffers[]) -> bytes | -errno: a FUSE reply (header + payload) in one write, without a copy. */
static napi_value write_v(napi_env env, napi_callback_info info) {
  args_t a;
  int fd;
  bool is_array;
  uint32_t count;
  ssize_t n;
  struct iovec small[16], *iov = small;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0) return number(env, -EINVAL);
  if (napi_is_array(env, a.argv[1], &is_array) != napi_ok || !is_array) return number(env, -EINVAL);
  if (napi_get_array_length(env, a.argv[1], &count) != napi_ok || count > MAX_IOVECS) return number(env, -EINVAL);
  if (count > sizeof small / sizeof small[0] && (iov = calloc(count, sizeof *iov)) == NULL) return number(env, -ENOMEM);
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    char *data;
    if (napi_get_element(env, a.argv[1], i, &element) != napi_ok || get_buffer(env, element, &data, &iov[i].iov_len) < 0) {
      if (iov != small) free(iov);
      return number(env, -EINVAL);
    }
    iov[i].iov_base = data;
  }
  SYSCALL(n, writev(fd, iov, (int)count));
  if (iov != small) free(iov);
  return number(env, n);
}

/* setNonblocking(fd, on) -> 0 | -errno: an fd received from fusermount3 arrives blocking. */
static napi_value set_nonblocking(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, flags, rc;
  bool on;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_bool(&a, 1, &on) < 0) return number(env, -EINVAL);
  SYSCALL(flags, fcntl(fd, F_GETFL));
  if (flags < 0) return number(env, flags);
  SYSCALL(rc, fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK));
  return number(env, rc);
}

/* ---------- 3. mounting ---------- */

/* mount(source, target, fstype, flags, data | null) -> 0 | -errno (mount(2); root only). */
static napi_value do_mount(napi_env env, napi_callback_info info) {
  args_t a;
  char source[PATH_MAX], target[PATH_MAX], fstype[256], data_buf[4096];
  const char *s, *t, *f, *d;
  int64_t flags;
  int rc;
  if (get_args(env, info, &a) < 0) return number(env, -EINVAL);
  if ((rc = get_string(&a, 0, source, sizeof source, false, &s)) < 0 ||
      (rc = get_string(&a, 1, target, sizeof target, false, &t)) < 0 ||
      (rc = get_string(&a, 2, fstype, sizeof fstype, false, &f)) < 0 ||
      (rc = get_integer(&a, 3, 0, 4294967295.0, &flags)) < 0 ||
      (rc = get_string(&a, 4, data_buf, sizeof data_buf, true, &d)) < 0)
    return number(env, rc);
  SYSCALL(rc, mount(s, t, f, (unsigned long)flags, d));
  return number(env, rc);
}

/* umount2(target, flags) -> 0 | -errno (MNT_DETACH: lazy, MNT_FORCE, ...). */
static napi_value do_umount2(napi_env env, napi_callback_info info) {
  args_t a;
  char target[PATH_MAX];
  const char *t;
  int flags, rc;
  if (get_args(env, info, &a) < 0) return number(env, -EINVAL);
  if ((rc = get_string(&a, 0, target, sizeof target, false, &t)) < 0) return number(env, rc);
  if (get_int(&a, 1, &flags) < 0) return number(env, -EINVAL);
  SYSCALL(rc, umount2(t, flags));
  return number(env, rc);
}

/* ---------- 4. passing fds (fusermount3's _FUSE_COMMFD) ---------- */

/* socketpair() -> [fd0 (close-on-exec), fd1 (inheritable, for the child)] | -errno. */
static napi_value do_socketpair(napi_env env, napi_callback_info info) {
  (void)info;
  int fds[2], rc;
  napi_value result, v;
  SYSCALL(rc, socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds));
  if (rc < 0) return number(env, rc);
  SYSCALL(rc, fcntl(fds[1], F_SETFD, 0));
  if (rc < 0) {
    close(fds[0]);
    close(fds[1]);
    return number(env, rc);
  }
  napi_create_array_with_length(env, 2, &result);
  for (uint32_t i = 0; i < 2; i++) {
    napi_create_int32(env, fds[i], &v);
    napi_set_element(env, result, i, v);
  }
  return result;
}

/*
 * recvFd(socketFd) -> fd (close-on-exec) | -errno. Never blocks (MSG_DONTWAIT):
 * -EAGAIN when nothing has arrived yet, -ENOMSG at end of stream or for a
 * message without an fd. Extra fds in the message are closed.
 */
static napi_value recv_fd(napi_env env, napi_callback_info info) {
  args_t a;
  int sock, received = -1;
  ssize_t n;
  char byte;
  struct iovec iov = {.iov_base = &byte, .iov_len = 1};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * 4)];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &sock) < 0) return number(env, -EINVAL);
  SYSCALL(n, recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
  if (n < 0) return number(env, n);
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      if (received < 0) received = fd;
      else close(fd);
    }
  }
  return number(env, received >= 0 ? received : -ENOMSG);
}

/* ---------- 5. sparse files ---------- */

/* fallocate(fd, mode, offset, length) -> 0 | -errno (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE). */
static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, mode, rc;
  int64_t offset, length;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_int(&a, 1, &mode) < 0 ||
      get_integer(&a, 2, 0, MAX_SAFE_INTEGER, &offset) < 0 || get_integer(&a, 3, 1, MAX_SAFE_INTEGER, &length) < 0)
    return number(env, -EINVAL);
  SYSCALL(rc, fallocate(fd, mode, (off_t)offset, (off_t)length));
  return number(env, rc);
}

/* lseek(fd, offset, whence) -> offset | -errno (SEEK_DATA / SEEK_HOLE; -ENXIO past the last data). */
static napi_value do_lseek(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, whence;
  int64_t offset;
  off_t rc;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 ||
      get_integer(&a, 1, -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER, &offset) < 0 || get_int(&a, 2, &whence) < 0)
    return number(env, -EINVAL);
  SYSCALL(rc, lseek(fd, (off_t)offset, whence));
  return number(env, rc);
}

/*
 * preadNowait(fd, buffer, bufferOffset, length, position) -> bytes | -errno:
 * preadv2 with RWF_NOWAIT reads only what is in the page cache (a short count
 * when only part of it is); -EAGAIN when the first byte is not, -EOPNOTSUPP on
 * file systems without RWF_NOWAIT.
 */
static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  args_t a;
  int fd;
  char *data;
  size_t length;
  int64_t position;
  ssize_t n;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_buffer_range(&a, 1, &data, &length) < 0 ||
      get_integer(&a, 4, 0, MAX_SAFE_INTEGER, &position) < 0)
    return number(env, -EINVAL);
  struct iovec iov = {.iov_base = data, .iov_len = length};
  SYSCALL(n, preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT));
  return number(env, n);
}

/* ---------- 6. open-file-description byte locks (the ones qemu takes) ---------- */

static int get_flock(const args_t *a, struct flock *fl) {
  int type;
  int64_t start, length;
  if (get_int(a, 1, &type) < 0 || (type != F_RDLCK && type != F_WRLCK && type != F_UNLCK) ||
      get_integer(a, 2, 0, MAX_SAFE_INTEGER, &start) < 0 || get_integer(a, 3, 0, MAX_SAFE_INTEGER, &length) < 0)
    return -EINVAL;
  memset(fl, 0, sizeof *fl); /* l_pid must be 0 for OFD locks */
  fl->l_type = (short)type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)length; /* 0: to the end of the file, however far it grows */
  return 0;
}

/* ofdLock(fd, F_RDLCK | F_WRLCK | F_UNLCK, start, length) -> 0 | -EAGAIN or -EACCES (held elsewhere) | -errno. Never waits. */
static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, rc;
  struct flock fl;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_flock(&a, &fl) < 0) return number(env, -EINVAL);
  SYSCALL(rc, fcntl(fd, F_OFD_SETLK, &fl));
  return number(env, rc);
}

/*
 * ofdTest(fd, F_RDLCK | F_WRLCK, start, length) -> F_UNLCK when such a lock
 * could be taken, else the type of a conflicting lock (F_RDLCK is 0, so
 * "free" is F_UNLCK, as fcntl says it) | -errno. Locks held through fd itself
 * never conflict.
 */
static napi_value ofd_test(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, rc;
  struct flock fl;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_flock(&a, &fl) < 0 || fl.l_type == F_UNLCK) return number(env, -EINVAL);
  SYSCALL(rc, fcntl(fd, F_OFD_GETLK, &fl));
  return number(env, rc < 0 ? rc : fl.l_type);
}

/* ---------- 7. /dev/fuse ---------- */

/* ioctlClone(fd, sessionFd) -> 0 | -errno: FUSE_DEV_IOC_CLONE makes a fresh /dev/fuse fd serve sessionFd's connection. */
static napi_value ioctl_clone(napi_env env, napi_callback_info info) {
  args_t a;
  int fd, session, rc;
  if (get_args(env, info, &a) < 0 || get_fd(&a, 0, &fd) < 0 || get_fd(&a, 1, &session) < 0) return number(env, -EINVAL);
  uint32_t arg = (uint32_t)session;
  SYSCALL(rc, ioctl(fd, FUSE_DEV_IOC_CLONE, &arg));
  return number(env, rc);
}

/* ---------- registration ---------- */

/* Closes every poll still open when the environment (process or worker) ends. */
static void on_teardown_closed(uv_handle_t *handle) {
  poll_t *p = handle->data;
  instance_t *inst = instance(p->env);
  free(p);
  if (inst != NULL && --inst->closing == 0) napi_remove_async_cleanup_hook(inst->cleanup);
}

static void on_teardown(napi_async_cleanup_hook_handle handle, void *data) {
  instance_t *inst = data;
  inst->cleanup = handle;
  inst->closing = 0;
  while (inst->polls != NULL) {
    poll_t *p = inst->polls;
    inst->polls = p->next;
    inst->closing++;
    close_poll(p, on_teardown_closed);
  }
  if (inst->closing == 0) napi_remove_async_cleanup_hook(handle);
}

static void free_instance(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

static void set_constant(napi_env env, napi_value object, const char *name, int64_t value) {
  napi_set_named_property(env, object, name, number(env, value));
}

NAPI_MODULE_INIT() {
  static const struct {
    const char *name;
    napi_callback fn;
  } functions[] = {
      {"pollStart", poll_start},       {"pollStop", poll_stop},     {"pollRef", poll_ref},
      {"readInto", read_into},         {"writev", write_v},         {"setNonblocking", set_nonblocking},
      {"mount", do_mount},             {"umount2", do_umount2},     {"socketpair", do_socketpair},
      {"recvFd", recv_fd},             {"fallocate", do_fallocate}, {"lseek", do_lseek},
      {"preadNowait", pread_nowait},   {"ofdLock", ofd_lock},       {"ofdTest", ofd_test},
      {"ioctlClone", ioctl_clone},
  };
  static const struct {
    const char *name;
    int64_t value;
  } constants[] = {
      {"SEEK_SET", SEEK_SET},
      {"SEEK_CUR", SEEK_CUR},
      {"SEEK_END", SEEK_END},
      {"SEEK_DATA", SEEK_DATA},
      {"SEEK_HOLE", SEEK_HOLE},
      {"FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE},
      {"FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE},
      {"FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE},
      {"F_RDLCK", F_RDLCK},
      {"F_WRLCK", F_WRLCK},
      {"F_UNLCK", F_UNLCK},
      {"MS_RDONLY", MS_RDONLY},
      {"MS_NOSUID", MS_NOSUID},
      {"MS_NODEV", MS_NODEV},
      {"MS_NOEXEC", MS_NOEXEC},
      {"MS_NOATIME", MS_NOATIME},
      {"MNT_FORCE", MNT_FORCE},
      {"MNT_DETACH", MNT_DETACH},
      {"MNT_EXPIRE", MNT_EXPIRE},
      {"UMOUNT_NOFOLLOW", UMOUNT_NOFOLLOW},
      {"FUSE_DEV_IOC_CLONE", (int64_t)FUSE_DEV_IOC_CLONE},
  };
  napi_value fn, consts;
  instance_t *inst = calloc(1, sizeof *inst);
  if (inst == NULL || napi_set_instance_data(env, inst, free_instance, NULL) != napi_ok) {
    free(inst);
    napi_throw_error(env, NULL, "imgmount addon: out of memory");
    return NULL;
  }
  napi_add_async_cleanup_hook(env, on_teardown, inst, NULL);
  for (size_t i = 0; i < sizeof functions / sizeof functions[0]; i++) {
    napi_create_function(env, functions[i].name, NAPI_AUTO_LENGTH, functions[i].fn, NULL, &fn);
    napi_set_named_property(env, exports, functions[i].name, fn);
  }
  napi_create_object(env, &consts);
  for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) set_constant(env, consts, constants[i].name, constants[i].value);
  napi_set_named_property(env, exports, "constants", consts);
  return exports;
}
