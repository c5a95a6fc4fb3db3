/* Bounded-time reads and writes on file descriptors a peer shares with us.
 *
 * O_NONBLOCK lives on the open file *description*, which a guest that passed
 * us an eventfd shares with us: it can clear the flag at any moment, and
 * eventfd has no per-call non-blocking flag. A check-then-write cannot be
 * made safe (the guest can fill the counter between the check and the write),
 * so every call here is guarded: a per-thread POSIX timer sends this thread a
 * real-time signal whose handler does nothing and is installed without
 * SA_RESTART, which makes a blocked read()/write() return EINTR. The timer is
 * periodic, so a signal that lands before the call starts is followed by
 * another one. A poll() first answers the common cases (counter full, nothing
 * to read) without arming anything.
 *
 * Reads need no guard where the kernel supports it: preadv2(RWF_NOWAIT) on an
 * eventfd (Linux 5.12 and later) returns EAGAIN instead of blocking whatever
 * O_NONBLOCK says, in one system call instead of four. pcisplit_nowait_read
 * reports -EOPNOTSUPP where it cannot, and the caller then uses the guarded read.
 * Writes have no such flag (pwritev2 refuses RWF_NOWAIT on an eventfd).
 *
 * Return values: bytes transferred (>= 0), or a negative errno:
 *   -EAGAIN     the call would block right now (counter full / empty)
 *   -ETIMEDOUT  the call blocked for the whole guard time and was interrupted
 *   other       what read()/write() reported (-EBADF...)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* BEGIN CDEF */
long long pcisplit_guarded_write(int fd, const void *buf, size_t len, long long timeout_ns);
long long pcisplit_guarded_read(int fd, void *buf, size_t len, long long timeout_ns);
long long pcisplit_nowait_read(int fd, void *buf, size_t len);
int pcisplit_guard_signal(void);
/* END CDEF */

static int guard_signo;
static int guard_install_error;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static __thread timer_t guard_timer;
static __thread int guard_timer_ready;

static void guard_handler(int sig) { (void)sig; /* only here to interrupt the call */ }

static void guard_install(void)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = guard_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the blocked call must return EINTR */
    guard_signo = SIGRTMAX - 1;
    if (sigaction(guard_signo, NULL, &old) != 0) {
        guard_install_error = errno;
        return;
    }
    if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler != guard_handler) {
        guard_install_error = EBUSY; /* someone else owns this signal: refuse to steal it */
        return;
    }
    if (sigaction(guard_signo, &sa, NULL) != 0)
        guard_install_error = errno;
}

int pcisplit_guard_signal(void)
{
    pthread_once(&guard_once, guard_install);
    return guard_install_error ? -guard_install_error : guard_signo;
}

static int guard_arm(long long timeout_ns)
{
    if (!guard_timer_ready) {
        sigset_t set;
        struct sigevent sev;
        int signo = pcisplit_guard_signal();
        if (signo < 0)
            return signo;
        sigemptyset(&set);
        sigaddset(&set, signo);
        if (pthread_sigmask(SIG_UNBLOCK, &set, NULL) != 0)
            return -EINVAL;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = signo;
        sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
        if (timer_create(CLOCK_MONOTONIC, &sev, &guard_timer) != 0)
            return -errno;
        guard_timer_ready = 1;
    }
    struct itimerspec its;
    its.it_value.tv_sec = timeout_ns / 1000000000LL;
    its.it_value.tv_nsec = timeout_ns % 1000000000LL;
    its.it_interval = its.it_value; /* periodic: an early signal is followed by another */
    if (timer_settime(guard_timer, 0, &its, NULL) != 0)
        return -errno;
    return 0;
}

static void guard_disarm(void)
{
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    /* A signal generated just before this is delivered on the return from this call. */
    timer_settime(guard_timer, 0, &its, NULL);
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long guarded_io(int fd, void *buf, size_t len, long long timeout_ns, int writing)
{
    struct pollfd p;
    long long deadline, result;
    int rc;
    if (timeout_ns <= 0)
        return -EINVAL;
    p.fd = fd;
    p.events = writing ? POLLOUT : POLLIN;
    p.revents = 0;
    do {
        rc = poll(&p, 1, 0);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    if (p.revents & POLLNVAL)
        return -EBADF;
    if (!(p.revents & (p.events | POLLERR | POLLHUP)))
        return -EAGAIN;
    rc = guard_arm(timeout_ns);
    if (rc < 0)
        return rc;
    deadline = now_ns() + timeout_ns;
    for (;;) {
        ssize_t n = writing ? write(fd, buf, len) : read(fd, buf, len);
        if (n >= 0) {
            result = n;
            break;
        }
        if (errno != EINTR) {
            result = -errno;
            break;
        }
        if (now_ns() >= deadline) {
            result = -ETIMEDOUT; /* our guard fired: the peer made this call block */
            break;
        }
        /* Some other signal (SIGINT...): its handler only sets a flag; try again. */
    }
    guard_disarm();
    return result;
}

long long pcisplit_guarded_write(int fd, const void *buf, size_t len, long long timeout_ns)
{
    return guarded_io(fd, (void *)buf, len, timeout_ns, 1);
}

long long pcisplit_guarded_read(int fd, void *buf, size_t len, long long timeout_ns)
{
    return guarded_io(fd, buf, len, timeout_ns, 0);
}

long long pcisplit_nowait_read(int fd, void *buf, size_t len)
{
#ifdef RWF_NOWAIT
    struct iovec iov;
    ssize_t n;
    iov.iov_base = buf;
    iov.iov_len = len;
    do {
        n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    if (n >= 0)
        return n;
    if (errno == EINVAL || errno == ENOSYS)
        return -EOPNOTSUPP; /* an older kernel: no per-call flag, use the guard */
    return -errno;
#else
    (void)fd; (void)buf; (void)len;
    return -EOPNOTSUPP;
#endif
}
