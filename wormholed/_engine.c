/*
 * wormholed._engine: the per-connection TCP path in C. One engine is an epoll set and a pthread
 * that never touches Python: it accepts on listening sockets it is given, connects each client to
 * its listener's target (in the target's network namespace), relays bytes both ways and closes.
 * Python is the control plane, through the flat we_* API at the end (wormholed/engine.py calls it
 * with ctypes, the GIL released, and documents it); what the engine cannot finish it hands off.
 *
 * Invariants
 * - Threads. The engine thread shares with callers only the command queue, the handoff queue, the
 *   listener table and `closing` (under mu), the listeners' counters (atomics, read under mu so
 *   that the listener cannot be freed meanwhile) and the eventfds. All else (connections, spares,
 *   the pipe pool, a listener's fd and target) is the engine thread's from the listener's LISTEN
 *   command until its UNLISTEN ran (or the thread was joined); only then is a listener freed.
 * - Commands run after an epoll batch, never inside one, so no event of the batch refers to a
 *   freed listener; they run in the order posted. we_close() sets `closing` under mu and posts
 *   STOP; no command is posted after it (E_CLOSED). Only relay() does not wait for its command.
 * - A closed connection leaves every list for `dead`, freed after the batch; later events of the
 *   batch see `closed`. Every socket leaves the epoll set before close(): a fork may share it.
 * - Fds: each fd the engine owns is in exactly one place (a listener: fd, netns, spares; a
 *   connection: fd[2], a half's pipe; the pipe pool; the handoff queue) and is closed once, when
 *   it leaves it, unless handed to Python. Only the engine thread calls setns, and goes home after.
 * - Idle cost: 2 fds and ~250 bytes per relayed connection. A direction copies through the
 *   thread's one read buffer and allocates only what a write left over; after a read that filled
 *   the buffer it splices through a pipe of the pool. A pipe whose source would block is parked
 *   (e->parked, in time order) and goes back to the pool after PIPE_IDLE_MS unused.
 * - Semantics are wormholed/proxy/tcp.py's: edge-triggered epoll registered once per socket;
 *   back-pressure by not reading a source while its bytes wait; EOF -> shutdown(SHUT_WR) of the
 *   other side, both EOFs -> close (FINs); ECONNRESET/EPIPE -> RST both (SO_LINGER 0); an idle
 *   socket reset after its EOF is noticed through EPOLLERR + SO_ERROR.
 * - Limits. A listener's `open` counts its connections wherever they are: connecting, relayed,
 *   or handed off (until relay() takes them back, or Python says dropped). An accept while open
 *   >= max_conns, or onto one of the last FD_RESERVE fds under RLIMIT_NOFILE, is reset at once
 *   and counted refused, not total. With idle_ms, relayed connections are in `idle`, oldest
 *   activity first; sweep() resets those idle for idle_ms, at most SWEEP_MS late (e->now per batch).
 * - Export and adopt (a successor process takes the connections over). EXPORT takes the listener
 *   off the epoll set, closes our dup of it and moves each connection, struct and all, out of
 *   every list and the epoll set, uncounted from open: no socket is closed, shut down or touched
 *   (a tail still connecting, which never carried a byte, is closed; its client goes alone). A
 *   half's pending bytes are exact: in buf, else in its pipe, never both. The sockets keep the
 *   rest: a new registration reports RDHUP/ERR again, splice's EINVAL (nosplice) recurs.
 *   `exported` (under mu) then refuses relay(), adopt() and export() of the lid. ADOPT is RELAY
 *   with the halves' state (the pipe's bytes read behind buffered ones, so the invariant holds).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Python.h (for PyInit only) brings errno.h, stdlib.h, string.h */
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 65536      /* the thread's read buffer; a read that fills it switches to splice */
#define PIPE_SIZE (1 << 20) /* asked for with F_SETPIPE_SZ; the kernel may give less */
#define ROUNDS 16           /* reads (pipe-fulls) per direction per wake-up */
#define ACCEPT_BATCH 64
#define POOL_MAX 128        /* idle empty pipes kept */
#define PIPE_IDLE_MS 1000   /* a direction's pipe, empty and unused this long, goes back to the pool */
#define SPARES 32           /* sockets made per trip into another namespace */
#define CONNECT_MS 5000
#define BACKOFF_MS 100
#define FD_RESERVE 64       /* fds under RLIMIT_NOFILE left to Python's control channel (limits.py) */
#define SWEEP_MS 100        /* idle connections are reset at most this late (sweeps at most this often) */
#define MAX_EVENTS 256
#define SPLICE_FLAGS (SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
#define SOCK_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
enum { TAG_LISTENER = 2, TAG_WAKE = 3 }; /* epoll data: pointer | tag; tags 0, 1: a connection's side */
enum { OPEN, TOTAL, BYTES_IN, BYTES_OUT, REFUSED, NCOUNTS }; /* a listener's counters */

/* ---- intrusive doubly linked lists; next == NULL: in no list ---- */
struct link { struct link *prev, *next; };
#define OF(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))
static void l_init(struct link *h) { h->prev = h->next = h; }
static int l_empty(const struct link *h) { return h->next == h; }
static void l_add(struct link *h, struct link *n) { n->prev = h->prev; n->next = h; h->prev->next = n; h->prev = n; }
static void l_del(struct link *n) {
    if (n->next) { n->prev->next = n->next; n->next->prev = n->prev; n->next = n->prev = NULL; }
}

struct listener {
    struct link table;       /* Python's table of lids (mu) */
    struct link active;      /* the engine's listeners */
    int lid, fd, registered; /* fd: our dup of the listening socket; registered: in the epoll set */
    int exported;            /* export() posted (mu): relay(), adopt() and export() refused */
    int has_target, family, netns; /* netns: our dup, -1: the engine's home */
    int max_conns, idle_ms;  /* set_limits; 0: none */
    socklen_t alen;
    struct sockaddr_storage addr; /* the target */
    int spares[SPARES], nspares;
    int64_t resume_at;       /* accepting paused (EMFILE...) until then */
    struct link backoff, conns, idle; /* backoff: in e->backoffs while paused; idle: see Limits */
    int64_t n[NCOUNTS];      /* atomics: open, total, bytes in (client -> tail), bytes out, refused */
};

struct half {                /* one direction: fd[dir] -> fd[!dir] */
    int pr, pw;              /* a pipe of the pool while splicing, else -1 */
    uint32_t pending, off;   /* bytes read, not yet written: in buf if any, else in the pipe */
    char *buf;               /* what a partial write left over (read/write mode) */
    uint8_t dir, done, nosplice, queued, hup; /* hup: the source reported RDHUP/HUP/ERR */
    struct link ready;
    struct link parked;      /* in e->parked while its pipe is empty and unused, since parked_at */
    int64_t parked_at;
};

struct conn {
    int fd[2];               /* 0: client, 1: tail */
    uint8_t reg[2], connecting, closed;
    struct half h[2];
    struct listener *l;
    struct link node, timer; /* node: in l->conns, in e->dead once closed; timer: in e->connecting, l->idle */
    int64_t at;              /* connecting: the connect's deadline; relayed: when bytes last moved (or the relay began) */
};

enum { C_LISTEN, C_TARGET, C_CLEAR, C_LIMITS, C_RELAY, C_ADOPT, C_EXPORT, C_UNLISTEN, C_STOP };
struct cmd {
    struct cmd *next;
    int op, sync, done, err, a, b, family; /* a, b: relay's fds, limits; a: target's netns fd */
    struct listener *l;
    socklen_t alen;
    struct sockaddr_storage addr;
    struct link conns;       /* by node: adopt's connection (in no listener yet), export's exported ones */
};

struct handoff { int lid, fd, err; };

struct engine {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ep, wakefd, handfd, home, started; /* wakefd: commands posted; handfd: handoffs queued */
    dev_t home_dev;
    ino_t home_ino;
    pthread_t thread;
    struct cmd *cmds, **cmds_tail; /* under mu: cmds, hq, hn, hcap, table, next_lid */
    struct handoff *hq;
    size_t hn, hcap;
    struct link table;
    int next_lid;
    int closing;             /* under mu: close() began; commands are refused (E_CLOSED) */
    int stop, away, fd_ceiling; /* the engine thread's from here; away: not in its home netns */
    int64_t now, sweep_at;   /* now: read after each epoll_wait; sweep_at: the next sweep() */
    char *rbuf;
    int pool[POOL_MAX][2], npool;
    struct link active, ready, connecting, backoffs, dead, parked;
    struct cmd stop_cmd;
};

static int64_t now_ms(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void count(struct listener *l, int which, int64_t n) { __atomic_fetch_add(&l->n[which], n, __ATOMIC_RELAXED); }

static void abort_fd(int fd) { /* close with a reset */
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), close(fd);
}

static void ring(int eventfd) {
    uint64_t one = 1;
    if (write(eventfd, &one, sizeof one) < 0) { /* cannot overflow: its reader resets it */ }
}

static int sock_error(int fd) {
    int err = 0; socklen_t len = sizeof err;
    return getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 ? errno : err;
}

/* ---- the pipe pool ---- */

static void take_pipe(struct engine *e, struct half *h) {
    int p[2];
    if (e->npool) { e->npool--, h->pr = e->pool[e->npool][0], h->pw = e->pool[e->npool][1]; return; }
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return; /* stay in read/write mode */
    fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE);             /* above pipe-max-size: keep the default */
    h->pr = p[0], h->pw = p[1];
}

/* The half's pipe back to the pool if it is empty, else closed. */
static void release_pipe(struct engine *e, struct half *h) {
    l_del(&h->parked);
    if (h->pr < 0) return;
    if ((h->buf || !h->pending) && e->npool < POOL_MAX)
        e->pool[e->npool][0] = h->pr, e->pool[e->npool][1] = h->pw, e->npool++;
    else close(h->pr), close(h->pw);
    h->pr = h->pw = -1;
}

/* A stream that drained its source keeps its pipe a while: the next burst splices at once instead
   of copying a buffer-full before it switches. Parked pipes are released by age (expire), so an
   idle connection is back to its 2 fds within PIPE_IDLE_MS. */
static void park_pipe(struct engine *e, struct half *h) {
    l_del(&h->parked);
    h->parked_at = e->now;
    l_add(&e->parked, &h->parked);
}

static void drop_pool(struct engine *e) {
    while (!l_empty(&e->parked)) release_pipe(e, OF(e->parked.next, struct half, parked));
    for (; e->npool; e->npool--) close(e->pool[e->npool - 1][0]), close(e->pool[e->npool - 1][1]);
}

/* ---- handoffs to Python ---- */

static void handoff(struct engine *e, struct listener *l, int fd, int err) { /* still counted open */
    pthread_mutex_lock(&e->mu);
    if (e->hn == e->hcap) {
        size_t cap = e->hcap ? 2 * e->hcap : 64;
        struct handoff *hq = realloc(e->hq, cap * sizeof *hq);
        if (!hq) {
            pthread_mutex_unlock(&e->mu);
            return count(l, OPEN, -1), abort_fd(fd);
        }
        e->hq = hq, e->hcap = cap;
    }
    e->hq[e->hn++] = (struct handoff){l->lid, fd, err};
    if (e->hn == 1) ring(e->handfd); /* handoffs() resets it */
    pthread_mutex_unlock(&e->mu);
}

/* ---- connections ---- */

static int watch(struct engine *e, struct conn *c, int side) {
    struct epoll_event ev = {.events = SOCK_EVENTS, .data.u64 = (uintptr_t)c | (unsigned)side};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, c->fd[side], &ev) < 0) return -1;
    return c->reg[side] = 1, 0;
}

static void close_sock(struct engine *e, struct conn *c, int side, int reset) {
    if (c->reg[side]) epoll_ctl(e->ep, EPOLL_CTL_DEL, c->fd[side], NULL);
    reset ? abort_fd(c->fd[side]) : (void)close(c->fd[side]);
}

/* Leave every list for e->dead; the halves' pipes and buffers go. */
static void release(struct engine *e, struct conn *c) {
    c->closed = 1;
    l_del(&c->node), l_del(&c->timer);
    for (int d = 0; d < 2; d++) {
        l_del(&c->h[d].ready);
        release_pipe(e, &c->h[d]);
        free(c->h[d].buf), c->h[d].buf = NULL;
    }
    l_add(&e->dead, &c->node);
}

static void close_conn(struct engine *e, struct conn *c, int reset) {
    close_sock(e, c, 0, reset), close_sock(e, c, 1, reset);
    count(c->l, OPEN, -1);
    release(e, c);
}

static struct conn *new_conn(struct listener *l, int client, int tail) { /* l NULL: adopt()'s, linked later */
    struct conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->fd[0] = client, c->fd[1] = tail, c->l = l;
    for (int d = 0; d < 2; d++) c->h[d].pr = c->h[d].pw = -1, c->h[d].dir = (uint8_t)d;
    if (l) l_add(&l->conns, &c->node);
    return c;
}

static void failed(struct engine *e, struct conn *c, int err) { close_conn(e, c, err == ECONNRESET || err == EPIPE); }

static void eof(struct engine *e, struct conn *c, int d) {
    c->h[d].done = 1;
    release_pipe(e, &c->h[d]); /* empty: this direction is over */
    if (c->h[!d].done) close_conn(e, c, 0); /* both read to EOF: FINs, not RSTs */
    else shutdown(c->fd[!d], SHUT_WR);       /* an error here: the other half will tell */
}

static void queue(struct engine *e, struct half *h) { if (!h->queued) h->queued = 1, l_add(&e->ready, &h->ready); }

/* Bytes moved (or the relay began): c goes to the tail of its listener's idle list, if it has one. */
static void touch(struct engine *e, struct conn *c) {
    c->at = e->now;
    if (!c->l->idle_ms) return;
    l_del(&c->timer), l_add(&c->l->idle, &c->timer);
    e->sweep_at = Py_MIN(e->sweep_at, c->at + c->l->idle_ms);
}

/* splice() refused the pipe -> dst: move what the pipe holds into a buffer. */
static int to_copy(struct half *h) {
    char *buf = malloc(h->pending);
    if (!buf) return ENOMEM;
    for (uint32_t got = 0; got < h->pending;) {
        ssize_t n = read(h->pr, buf + got, h->pending - got);
        if (n <= 0) return free(buf), n < 0 ? errno : EIO;
        got += (uint32_t)n;
    }
    h->buf = buf, h->off = 0, h->nosplice = 1;
    return 0;
}

/* Move bytes fd[d] -> fd[!d] until one of them would block (edge triggering), at most ROUNDS reads. */
static void pump(struct engine *e, struct conn *c, int d) {
    struct half *h = &c->h[d];
    int src = c->fd[d], dst = c->fd[!d], err = 0, end = 0, rounds = ROUNDS;
    int64_t moved = 0;
    ssize_t n, m;
    if (h->done) return;
    for (;;) {
        if (h->pending) {
            if (h->buf) m = send(dst, h->buf + h->off, h->pending, MSG_NOSIGNAL);
            else m = splice(h->pr, NULL, dst, NULL, h->pending, SPLICE_FLAGS);
            if (m < 0) {
                if (errno == EAGAIN) break; /* the writable edge resumes us */
                if (errno == EINVAL && !h->buf) {
                    if ((err = to_copy(h)) != 0) break;
                    release_pipe(e, h);
                    continue;
                }
                err = errno;
                break;
            }
            moved += m, h->pending -= (uint32_t)m;
            if (h->buf && !h->pending) free(h->buf), h->buf = NULL, h->off = 0;
            else if (h->buf) h->off += (uint32_t)m;
            continue;
        }
        if (rounds-- == 0) { queue(e, h); break; } /* let the other connections run; go on after this batch */
        if (h->pr >= 0) {
            n = splice(src, NULL, h->pw, NULL, PIPE_SIZE, SPLICE_FLAGS);
            if (n > 0) { h->pending = (uint32_t)n; l_del(&h->parked); continue; }
            if (n == 0) { end = 1; break; }
            if (errno == EAGAIN) { park_pipe(e, h); break; } /* drained, the pipe empty: parked */
            if (errno == EINVAL) { release_pipe(e, h); h->nosplice = 1; continue; } /* cannot splice */
            err = errno;
            break;
        }
        n = read(src, e->rbuf, BUF_SIZE);
        if (n == 0) { end = 1; break; }
        if (n < 0) { err = errno == EAGAIN ? 0 : errno; break; }
        m = send(dst, e->rbuf, (size_t)n, MSG_NOSIGNAL);
        if (m < 0 && errno != EAGAIN) { err = errno; break; }
        if (m < 0) m = 0;
        moved += m;
        if (m < n) {
            if (!(h->buf = malloc((size_t)(n - m)))) { err = ENOMEM; break; }
            memcpy(h->buf, e->rbuf + m, (size_t)(n - m));
            h->pending = (uint32_t)(n - m), h->off = 0;
        }
        if (n == BUF_SIZE) {
            if (!h->nosplice) take_pipe(e, h); /* a bulk transfer: splice from now on */
        } else if (!h->hup && !h->pending) {
            /* A short read drained the socket: what arrives next is a new edge, so the read that
               would say EAGAIN is skipped; not once the source hung up (no edge reports its EOF). */
            break;
        }
    }
    if (moved) count(c->l, d ? BYTES_OUT : BYTES_IN, moved), touch(e, c);
    if (err) failed(e, c, err);
    else if (end) eof(e, c, d);
}

static void connected(struct engine *e, struct conn *c) {
    c->connecting = 0;
    l_del(&c->timer), touch(e, c);
    /* Registering reports the current state as edges: the client's early bytes. */
    if ((!c->reg[1] && watch(e, c, 1) < 0) || watch(e, c, 0) < 0) close_conn(e, c, 1);
}

/* The connect failed: the client goes to Python with the errno. */
static void connect_failed(struct engine *e, struct conn *c, int err) {
    close_sock(e, c, 1, 0);
    handoff(e, c->l, c->fd[0], err);
    release(e, c);
}

static void on_conn(struct engine *e, struct conn *c, int s, uint32_t ev) {
    struct half *in = &c->h[s], *out = &c->h[!s]; /* in reads fd[s]; out writes it */
    if (c->closed) return;
    if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) in->hup = 1;
    if (c->connecting) { /* only the tail is registered */
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = ev & EPOLLOUT && !(ev & EPOLLERR) ? 0 : sock_error(c->fd[1]); /* a failure sets EPOLLERR */
        if (err) return connect_failed(e, c, err);
        connected(e, c);
        if (c->closed) return;
    }
    if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP) && out->pending && (pump(e, c, !s), c->closed)) return;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP) && !in->done && !in->pending && (pump(e, c, s), c->closed))
        return;
    if (ev & EPOLLERR && in->done && !out->pending) { /* an idle socket reset after its EOF */
        int err = sock_error(c->fd[s]);
        if (err) failed(e, c, err);
    }
}

/* ---- listeners ---- */

static int new_sock(int family) {
    int one = 1, fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void drop_spares(struct listener *l) { while (l->nspares) close(l->spares[--l->nspares]); }

/* A tail socket in the target's namespace, or -errno. Only this thread ever calls setns. */
static int tail_socket(struct engine *e, struct listener *l) {
    if (l->netns < 0 && !e->away) {
        int fd = new_sock(l->family);
        return fd < 0 ? -errno : fd;
    }
    if (!l->nspares) {
        int err = 0;
        if (setns(l->netns >= 0 ? l->netns : e->home, CLONE_NEWNET) < 0) return -errno;
        e->away = l->netns >= 0;
        while (l->nspares < SPARES) {
            int fd = new_sock(l->family);
            if (fd < 0) { err = errno; break; }
            l->spares[l->nspares++] = fd;
        }
        if (e->away) e->away = setns(e->home, CLONE_NEWNET) < 0; /* else: retried next time */
        if (!l->nspares) return -err;
    }
    return l->spares[--l->nspares];
}

static void dial(struct engine *e, struct listener *l, int client) {
    int tail = tail_socket(e, l);
    if (tail < 0) return handoff(e, l, client, -tail);
    struct conn *c = new_conn(l, client, tail);
    if (!c) return close(tail), handoff(e, l, client, ENOMEM);
    /* Bytes the client sends meanwhile wait in the kernel. */
    if (connect(tail, (struct sockaddr *)&l->addr, l->alen) == 0) return connected(e, c);
    if (errno != EINPROGRESS) return connect_failed(e, c, errno);
    if (watch(e, c, 1) < 0) return connect_failed(e, c, errno);
    c->connecting = 1;
    c->at = e->now + CONNECT_MS;
    l_add(&e->connecting, &c->timer); /* one timeout for all: the list is sorted */
}

static int listener_on(struct engine *e, struct listener *l) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uintptr_t)l | TAG_LISTENER};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, l->fd, &ev) < 0) return errno;
    return l->registered = 1, 0;
}

static void listener_off(struct engine *e, struct listener *l) {
    if (l->registered) epoll_ctl(e->ep, EPOLL_CTL_DEL, l->fd, NULL), l->registered = 0;
}

static int accept_ignored(int err) { /* errors that concern only the connection being accepted */
    switch (err) {
    case EPERM: case ECONNABORTED: case EPROTO: case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN:
    case ENONET: case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH: case EINTR:
        return 1;
    }
    return 0;
}

static void accept_some(struct engine *e, struct listener *l) {
    for (int i = 0; i < ACCEPT_BATCH && l->registered; i++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int err = errno;
            if (err == EAGAIN) return;
            if (accept_ignored(err)) continue;
            listener_off(e, l); /* level-triggered: it must leave the set while paused */
            if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
                drop_pool(e); /* idle pipes hold fds */
                l->resume_at = e->now + BACKOFF_MS;
                l_add(&e->backoffs, &l->backoff);
            } /* else: no longer accepting, as TcpProxy */
            return;
        }
        if (fd >= e->fd_ceiling || (l->max_conns && __atomic_load_n(&l->n[OPEN], __ATOMIC_RELAXED) >= l->max_conns)) {
            count(l, REFUSED, 1), abort_fd(fd); /* over a limit: reset at once, never relayed */
            continue;
        }
        count(l, TOTAL, 1), count(l, OPEN, 1);
        if (l->has_target) dial(e, l, fd);
        else handoff(e, l, fd, 0);
    }
}

static void unlisten_l(struct engine *e, struct listener *l) {
    listener_off(e, l);
    if (l->fd >= 0) close(l->fd), l->fd = -1;
    l_del(&l->backoff), l_del(&l->active);
    while (!l_empty(&l->conns)) close_conn(e, OF(l->conns.next, struct conn, node), 1);
    drop_spares(l);
    if (l->netns >= 0) close(l->netns), l->netns = -1;
    pthread_mutex_lock(&e->mu); /* its handoffs Python has not taken yet */
    size_t kept = 0;
    for (size_t i = 0; i < e->hn; i++)
        if (e->hq[i].lid == l->lid) abort_fd(e->hq[i].fd);
        else e->hq[kept++] = e->hq[i];
    e->hn = kept;
    pthread_mutex_unlock(&e->mu);
}

/* export(): c leaves the engine untouched, its struct and all, for Python (on out); the tail of a
   connect in progress, which never carried a byte, is closed and the client goes alone. What the halves
   hold is exact: bytes in buf, else in the pipe (pump never has both); an empty pipe goes back to the
   pool. The rest of a half's state the sockets keep: adopt's registration reports RDHUP/ERR again,
   and a successor finds EINVAL (nosplice) again without losing a byte; its ready queue is an edge. */
static void export_conn(struct engine *e, struct conn *c, struct link *out) {
    for (int s = 0; s < 2; s++)
        if (c->reg[s]) epoll_ctl(e->ep, EPOLL_CTL_DEL, c->fd[s], NULL), c->reg[s] = 0;
    if (c->connecting) close(c->fd[1]), c->fd[1] = -1;
    l_del(&c->node), l_del(&c->timer);
    for (int d = 0; d < 2; d++) {
        struct half *h = &c->h[d];
        l_del(&h->ready), l_del(&h->parked), h->queued = 0;
        if (h->buf || !h->pending) release_pipe(e, h);
    }
    count(c->l, OPEN, -1);
    l_add(out, &c->node);
}

/* Stop accepting (our dup of the listening socket closed: Python has its own) and export every
   connection; the counters stay, and those of the handoffs Python has not given back. */
static void export_l(struct engine *e, struct listener *l, struct link *out) {
    listener_off(e, l), l_del(&l->backoff);
    if (l->fd >= 0) close(l->fd), l->fd = -1;
    drop_spares(l);
    while (!l_empty(&l->conns)) export_conn(e, OF(l->conns.next, struct conn, node), out);
}

/* ---- the engine thread ---- */

static void run_command(struct engine *e, struct cmd *c) {
    struct listener *l = c->l;
    struct conn *conn;
    int one = 1;
    switch (c->op) {
    case C_LISTEN:
        if ((c->err = listener_on(e, l)) == 0) l_add(&e->active, &l->active);
        else close(l->fd), l->fd = -1;
        break;
    case C_TARGET:
    case C_CLEAR:
        drop_spares(l);
        if (l->netns >= 0) close(l->netns);
        l->netns = c->a, l->has_target = c->op == C_TARGET;
        l->family = c->family, l->alen = c->alen, l->addr = c->addr;
        break;
    case C_LIMITS: /* the relayed connections join (or leave) the idle list as if they just moved bytes */
        l->max_conns = c->a, l->idle_ms = c->b;
        for (struct link *n = l->conns.next; n != &l->conns; n = n->next)
            if (!(conn = OF(n, struct conn, node))->connecting) l_del(&conn->timer), touch(e, conn);
        break;
    case C_RELAY:
        if (!(conn = new_conn(l, c->a, c->b))) {
            abort_fd(c->a), abort_fd(c->b), count(l, OPEN, -1);
            break;
        }
        setsockopt(c->b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        connected(e, conn);
        break;
    case C_ADOPT: /* counted by adopt(); a done half's pipe is empty */
        conn = OF(c->conns.next, struct conn, node), conn->l = l;
        l_del(&conn->node), l_add(&l->conns, &conn->node);
        for (int d = 0; d < 2; d++) if (conn->h[d].done) release_pipe(e, &conn->h[d]);
        if (conn->h[0].done && conn->h[1].done) close_conn(e, conn, 0);
        else connected(e, conn);
        break;
    case C_EXPORT:
        export_l(e, l, &c->conns);
        break;
    case C_UNLISTEN:
        unlisten_l(e, l);
        break;
    case C_STOP:
        while (!l_empty(&e->active)) unlisten_l(e, OF(e->active.next, struct listener, active));
        e->stop = 1;
        break;
    }
}

static void run_commands(struct engine *e) {
    uint64_t v;
    if (read(e->wakefd, &v, sizeof v) < 0) { /* EAGAIN: a wake-up already consumed */ }
    pthread_mutex_lock(&e->mu);
    struct cmd *c = e->cmds;
    e->cmds = NULL, e->cmds_tail = &e->cmds;
    pthread_mutex_unlock(&e->mu);
    while (c) {
        struct cmd *next = c->next;
        run_command(e, c);
        if (c->sync) { /* the caller frees it once done is set: do not touch it after */
            pthread_mutex_lock(&e->mu);
            c->done = 1;
            pthread_cond_broadcast(&e->cv);
            pthread_mutex_unlock(&e->mu);
        } else free(c);
        c = next;
    }
}

static int next_timeout(struct engine *e) {
    int64_t at = e->sweep_at;
    if (!l_empty(&e->ready)) return 0;
    if (!l_empty(&e->connecting)) at = Py_MIN(at, OF(e->connecting.next, struct conn, timer)->at);
    if (!l_empty(&e->backoffs)) at = Py_MIN(at, OF(e->backoffs.next, struct listener, backoff)->resume_at);
    if (!l_empty(&e->parked)) at = Py_MIN(at, OF(e->parked.next, struct half, parked)->parked_at + PIPE_IDLE_MS);
    if (at == INT64_MAX) return -1;
    int64_t wait = at - now_ms();
    return wait < 0 ? 0 : wait > 60000 ? 60000 : (int)wait + 1;
}

/* Reset the relayed connections idle for their listener's idle_ms (an idle list is oldest first); the next
   sweep at the oldest deadline left, SWEEP_MS from now at the soonest. */
static void sweep(struct engine *e) {
    e->sweep_at = INT64_MAX;
    for (struct link *n = e->active.next; n != &e->active; n = n->next) {
        struct listener *l = OF(n, struct listener, active);
        while (!l_empty(&l->idle)) {
            struct conn *c = OF(l->idle.next, struct conn, timer);
            if (c->at + l->idle_ms > e->now) { e->sweep_at = Py_MIN(e->sweep_at, c->at + l->idle_ms); break; }
            close_conn(e, c, 1);
        }
    }
    e->sweep_at = Py_MAX(e->sweep_at, e->now + SWEEP_MS);
}

static void expire(struct engine *e) {
    int64_t now = e->now;
    if (now >= e->sweep_at) sweep(e);
    while (!l_empty(&e->parked)) { /* oldest first: parked in time order */
        struct half *h = OF(e->parked.next, struct half, parked);
        if (h->parked_at + PIPE_IDLE_MS > now) break;
        release_pipe(e, h);
    }
    while (!l_empty(&e->connecting)) {
        struct conn *c = OF(e->connecting.next, struct conn, timer);
        if (c->at > now) break;
        connect_failed(e, c, ETIMEDOUT);
    }
    while (!l_empty(&e->backoffs)) {
        struct listener *l = OF(e->backoffs.next, struct listener, backoff);
        if (l->resume_at > now) break;
        l_del(&l->backoff);
        if (listener_on(e, l) != 0) l->resume_at = now + BACKOFF_MS, l_add(&e->backoffs, &l->backoff);
    }
}

static void *run(void *arg) {
    struct engine *e = arg;
    struct epoll_event evs[MAX_EVENTS];
    struct link batch;
    while (!e->stop) {
        int n = epoll_wait(e->ep, evs, MAX_EVENTS, next_timeout(e)), commands = 0;
        e->now = now_ms();
        for (int i = 0; i < n; i++) {
            uint64_t u = evs[i].data.u64;
            void *p = (void *)(uintptr_t)(u & ~(uint64_t)3);
            switch (u & 3) {
            case TAG_WAKE: commands = 1; break;
            case TAG_LISTENER: accept_some(e, p); break;
            default: on_conn(e, p, (int)(u & 1), evs[i].events);
            }
        }
        /* Directions that used up their rounds; those they requeue wait for the next batch. */
        if (!l_empty(&e->ready)) {
            batch = e->ready, batch.next->prev = batch.prev->next = &batch;
            l_init(&e->ready);
            while (!l_empty(&batch)) {
                struct half *h = OF(batch.next, struct half, ready);
                struct conn *c = h->dir ? OF(h, struct conn, h[1]) : OF(h, struct conn, h[0]);
                l_del(&h->ready), h->queued = 0;
                pump(e, c, h->dir);
            }
        }
        expire(e);
        if (commands) run_commands(e);
        for (struct link *d; !l_empty(&e->dead);) d = e->dead.next, l_del(d), free(OF(d, struct conn, node));
    }
    return NULL;
}

/* ---- the API: wormholed/engine.py calls these through ctypes, which releases the GIL ---- */

enum { E_NOLID = -1000, E_EXPORTED = -1001, E_CLOSED = -1002 }; /* returned beside -errno */

static struct listener *find(struct engine *e, int lid) { /* under mu */
    for (struct link *n = e->table.next; n != &e->table; n = n->next)
        if (OF(n, struct listener, table)->lid == lid) return OF(n, struct listener, table);
    return NULL;
}

/* lid's listener with mu held; else NULL (mu released) and *err: closed, no such lid, or (live) exported. */
static struct listener *locked(struct engine *e, int lid, int live, int *err) {
    pthread_mutex_lock(&e->mu);
    struct listener *l = e->closing ? NULL : find(e, lid);
    if (l && !(live && l->exported)) return l;
    *err = e->closing ? E_CLOSED : l ? E_EXPORTED : E_NOLID;
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static void post(struct engine *e, struct cmd *c) { /* under mu */
    c->next = NULL, *e->cmds_tail = c, e->cmds_tail = &c->next;
    ring(e->wakefd);
}

/* Look lid up and post c for it (sync: wait for it); 0, -errno of the command, or an E_ code. */
static int command(struct engine *e, int lid, struct cmd *c, int drop) {
    int sync = c->sync, err; /* once posted, an async command is the engine's to free */
    if (!(c->l = locked(e, lid, c->op == C_RELAY || c->op == C_EXPORT, &err))) return err;
    c->l->exported |= c->op == C_EXPORT;
    if (drop) l_del(&c->l->table);
    post(e, c);
    if (!sync) return pthread_mutex_unlock(&e->mu), 0;
    while (!c->done) pthread_cond_wait(&e->cv, &e->mu);
    pthread_mutex_unlock(&e->mu);
    return -c->err;
}

static void teardown(struct engine *e) { /* the thread is not running */
    int *fds[] = {&e->ep, &e->wakefd, &e->handfd, &e->home};
    for (int i = 0; i < 4; i++) if (*fds[i] >= 0) close(*fds[i]), *fds[i] = -1;
    drop_pool(e);
    for (size_t i = 0; i < e->hn; i++) abort_fd(e->hq[i].fd);
    free(e->hq), e->hq = NULL, e->hn = e->hcap = 0;
    free(e->rbuf), e->rbuf = NULL;
}

/* Unlisten all, join the thread, close everything; idempotent. Calls after it return E_CLOSED. */
void we_close(struct engine *e) {
    struct link gone;
    l_init(&gone);
    pthread_mutex_lock(&e->mu);
    int first = !e->closing;
    e->closing = 1;
    if (first && e->started) {
        for (struct link *n; !l_empty(&e->table);) n = e->table.next, l_del(n), l_add(&gone, n); /* freed after */
        e->stop_cmd.op = C_STOP;
        post(e, &e->stop_cmd);
    }
    pthread_mutex_unlock(&e->mu);
    if (!first) return;
    if (e->started) pthread_join(e->thread, NULL), e->started = 0;
    while (!l_empty(&gone)) { /* a listen() that could not post still has its dup */
        struct listener *l = OF(gone.next, struct listener, table);
        l_del(&l->table);
        if (l->fd >= 0) close(l->fd);
        free(l);
    }
    teardown(e);
}

void we_free(struct engine *e) {
    we_close(e);
    pthread_mutex_destroy(&e->mu), pthread_cond_destroy(&e->cv);
    free(e);
}

/* A new engine with its thread running, or NULL with *err. */
struct engine *we_new(int *err) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_WAKE};
    struct stat st;
    struct rlimit rl;
    sigset_t all, old;
    struct engine *e = calloc(1, sizeof *e);
    if (!e) return *err = ENOMEM, NULL;
    pthread_mutex_init(&e->mu, NULL), pthread_cond_init(&e->cv, NULL);
    e->cmds_tail = &e->cmds, e->sweep_at = INT64_MAX;
    l_init(&e->table), l_init(&e->active), l_init(&e->ready);
    l_init(&e->connecting), l_init(&e->backoffs), l_init(&e->dead), l_init(&e->parked);
    e->stop_cmd.sync = 1; /* embedded: never freed; nobody waits for it (join does) */
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->handfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    /* The thread inherits this thread's namespace: its home, to come back to after setns. */
    e->home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (e->ep < 0 || e->wakefd < 0 || e->handfd < 0 || e->home < 0 || fstat(e->home, &st) < 0 ||
        epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wakefd, &ev) < 0 || !(e->rbuf = malloc(BUF_SIZE))) {
        *err = errno;
        goto fail;
    }
    e->home_dev = st.st_dev, e->home_ino = st.st_ino;
    /* accepting stops short of the last FD_RESERVE fds (RLIMIT_NOFILE as of now) */
    e->fd_ceiling = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < INT_MAX ? (int)rl.rlim_cur - FD_RESERVE : INT_MAX;
    sigfillset(&all); /* signals are for Python's threads */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    *err = pthread_create(&e->thread, NULL, run, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (*err) goto fail;
    e->started = 1;
    pthread_setname_np(e->thread, "wormhole-engine");
    return e;
fail:
    we_free(e);
    return NULL;
}

int we_fileno(struct engine *e) { return e->handfd; }

int we_listen(struct engine *e, int fd) {
    struct cmd c = {.op = C_LISTEN, .sync = 1};
    int on = 0, flags, err;
    socklen_t len = sizeof on;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) < 0) return -errno;
    if (!on) return -EINVAL;
    if ((flags = fcntl(fd, F_GETFL)) < 0 || (!(flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0))
        return -errno;
    struct listener *l = calloc(1, sizeof *l);
    if (!l) return -ENOMEM;
    if ((l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) return free(l), -errno;
    l->netns = -1;
    l_init(&l->conns), l_init(&l->idle);
    pthread_mutex_lock(&e->mu);
    int lid = l->lid = ++e->next_lid, closing = e->closing;
    if (!closing) l_add(&e->table, &l->table);
    pthread_mutex_unlock(&e->mu);
    if (closing) return close(l->fd), free(l), E_CLOSED;
    if ((err = command(e, lid, &c, 0)) == 0) return lid;
    pthread_mutex_lock(&e->mu); /* the LISTEN failed (it closed l->fd), or close() took l, to free it */
    if (!e->closing) l_del(&l->table), free(l);
    pthread_mutex_unlock(&e->mu);
    return err;
}

/* addr: a sockaddr_in or sockaddr_in6; netns: an fd of the target's namespace (dup()ed), -1: the engine's */
int we_set_target(struct engine *e, int lid, const void *addr, int alen, int netns) {
    struct cmd c = {.op = C_TARGET, .sync = 1, .a = -1, .alen = (socklen_t)alen};
    struct stat st;
    int err;
    if (alen < (int)sizeof(sa_family_t) || alen > (int)sizeof c.addr) return -EINVAL;
    memcpy(&c.addr, addr, (size_t)alen), c.family = c.addr.ss_family;
    if (netns >= 0) {
        if (fstat(netns, &st) < 0) return -errno;
        /* the engine's own namespace needs no setns (nor the privilege for it) */
        if ((st.st_dev != e->home_dev || st.st_ino != e->home_ino) && (c.a = fcntl(netns, F_DUPFD_CLOEXEC, 0)) < 0)
            return -errno;
    }
    if ((err = command(e, lid, &c, 0)) < 0 && c.a >= 0) close(c.a);
    return err;
}

int we_clear_target(struct engine *e, int lid) {
    struct cmd c = {.op = C_CLEAR, .sync = 1, .a = -1};
    return command(e, lid, &c, 0);
}

int we_set_limits(struct engine *e, int lid, int max_conns, int idle_ms) {
    struct cmd c = {.op = C_LIMITS, .sync = 1, .a = max_conns, .b = idle_ms};
    return command(e, lid, &c, 0);
}

/* Once it returns 0 the engine owns both fds; otherwise the caller still does. */
int we_relay(struct engine *e, int lid, int client, int tail) {
    struct cmd *c = calloc(1, sizeof *c);
    int err;
    if (!c) return -ENOMEM;
    c->op = C_RELAY, c->a = client, c->b = tail;
    if ((err = command(e, lid, c, 0)) < 0) free(c);
    return err;
}

int we_unlisten(struct engine *e, int lid) {
    struct cmd c = {.op = C_UNLISTEN, .sync = 1};
    int err = command(e, lid, &c, 1);
    if (!err) free(c.l); /* the engine no longer knows it */
    return err;
}

/* which: -1 dropped() (open - 1), 0 stats() (read), 1 add_stats() (add n[1..4]); n: open, total, in, out, refused */
int we_counts(struct engine *e, int lid, int which, int64_t n[NCOUNTS]) {
    int err;
    struct listener *l = locked(e, lid, 0, &err);
    if (!l) return err;
    for (int i = 0; i < NCOUNTS; i++)
        if (which == 0) n[i] = __atomic_load_n(&l->n[i], __ATOMIC_RELAXED);
        else if (which > 0 && i != OPEN) count(l, i, n[i]);
    if (which < 0) count(l, OPEN, -1);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* The handoffs queued (Python owns their fds), in a block for we_release; *n of them; eventfd reset. */
struct handoff *we_handoffs(struct engine *e, int *n) {
    uint64_t v;
    pthread_mutex_lock(&e->mu);
    struct handoff *hq = e->hq;
    *n = (int)e->hn;
    e->hq = NULL, e->hn = e->hcap = 0;
    if (read(e->handfd, &v, sizeof v) < 0) { /* EAGAIN: nothing was signalled */ }
    pthread_mutex_unlock(&e->mu);
    return hq;
}

void we_release(void *p) { free(p); }

/* A half as export() gives it and adopt() takes it: bytes read, not yet written, are buf[0:nbuf] first,
   then `piped` in the pipe (pr, pw; -1: none). done: EOF passed on. */
struct xhalf { int pr, pw; uint32_t piped, nbuf; char *buf; int done; };
struct xconn { int fd[2]; int64_t idle_ms; struct xhalf h[2]; }; /* fd[1] -1: a client alone */

/* lid's connections into one block (*out), their number or a negative code. The caller owns every
   fd and passes the block and each half's buf to we_release. */
int we_export(struct engine *e, int lid, struct xconn **out) {
    struct cmd c = {.op = C_EXPORT, .sync = 1};
    int n = 0, err;
    l_init(&c.conns);
    if ((err = command(e, lid, &c, 0)) < 0) return err;
    for (struct link *k = c.conns.next; k != &c.conns; k = k->next) n++;
    struct xconn *x = *out = calloc((size_t)n + 1, sizeof *x);
    int64_t now = now_ms();
    for (int i = 0; !l_empty(&c.conns); i++) {
        struct conn *k = OF(c.conns.next, struct conn, node);
        l_del(&k->node);
        if (x) x[i].fd[0] = k->fd[0], x[i].fd[1] = k->fd[1], x[i].idle_ms = now - k->at;
        for (int d = 0; d < 2; d++) {
            struct half *h = &k->h[d];
            if (h->buf) memmove(h->buf, h->buf + h->off, h->pending); /* buf[0:nbuf], for we_release */
            if (x) {
                x[i].h[d] = (struct xhalf){h->pr, h->pw, h->buf ? 0 : h->pending, h->buf ? h->pending : 0, h->buf, h->done};
                continue;
            }
            if (k->fd[d] >= 0) abort_fd(k->fd[d]); /* no memory to say what they are: reset */
            if (h->pr >= 0) close(h->pr), close(h->pw);
            free(h->buf);
        }
        free(k);
    }
    return x ? n : -ENOMEM;
}

/* relay() of a pair with its halves as export() gave them: 0 once the engine owns the sockets and
   pipes (and has read the pipes' bytes behind buffered ones where there are some), else the caller
   still owns them. Counted open and in total. */
int we_adopt(struct engine *e, int lid, int client, int tail, const struct xhalf *x) {
    struct cmd *c = calloc(1, sizeof *c);
    struct conn *k = new_conn(NULL, client, tail);
    int avail, err = -ENOMEM;
    if (!c || !k) goto fail;
    for (int d = 0; d < 2; d++) { /* a half in read/write mode holds bytes in buf only: the pipe's go after */
        struct half *h = &k->h[d];
        if ((x[d].pr < 0) != (x[d].pw < 0) || (x[d].pr < 0 && x[d].piped) || (x[d].done && (x[d].piped || x[d].nbuf)) ||
            (uint64_t)x[d].nbuf + x[d].piped > UINT32_MAX) { err = -EINVAL; goto fail; }
        if (x[d].pr >= 0 && ioctl(x[d].pr, FIONREAD, &avail) < 0) { err = -errno; goto fail; }
        if (x[d].pr >= 0 && (uint32_t)avail != x[d].piped) { err = -EBADMSG; goto fail; }
        h->pr = x[d].pr, h->pw = x[d].pw, h->done = (uint8_t)!!x[d].done, h->pending = x[d].nbuf + x[d].piped;
        if (x[d].nbuf && !(h->buf = malloc(h->pending))) { err = -ENOMEM; goto fail; }
        if (x[d].nbuf) memcpy(h->buf, x[d].buf, x[d].nbuf);
    }
    if (!(c->l = locked(e, lid, 1, &err))) goto fail;
    for (int d = 0; d < 2; d++) /* commit: the pipe's bytes after buffered (FIONREAD counted them) */
        for (uint32_t got = x[d].nbuf; k->h[d].buf && got < k->h[d].pending;) {
            ssize_t n = read(k->h[d].pr, k->h[d].buf + got, k->h[d].pending - got);
            if (n <= 0) { pthread_mutex_unlock(&e->mu), err = n < 0 ? -errno : -EIO; goto fail; }
            got += (uint32_t)n;
        }
    c->op = C_ADOPT;
    l_init(&c->conns), l_add(&c->conns, &k->node);
    count(c->l, TOTAL, 1), count(c->l, OPEN, 1);
    post(e, c);
    pthread_mutex_unlock(&e->mu);
    return 0;
fail:
    if (k) free(k->h[0].buf), free(k->h[1].buf);
    free(k), free(c);
    return err;
}

const int we_connect_timeout_ms = CONNECT_MS;

/* An importable module, so that `import wormholed._engine` finds this file (and PyInstaller packs it). */
PyMODINIT_FUNC PyInit__engine(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "wormholed._engine",
                                        "The native relay: its API is wormholed.engine (ctypes).", -1, NULL, NULL, NULL, NULL, NULL};
    return PyModule_Create(&module);
}
