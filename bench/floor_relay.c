/*
 * The floor of a user-space TCP relay, for bench/sidebyside.py: usage floor_relay PORT TARGET_PORT
 * (both on 127.0.0.1). One thread, one edge-triggered epoll set, accept4, a non-blocking connect,
 * then per readable socket read() into one buffer and send() it on, until a short read. Nothing
 * else: no counters, timers, limits, splice, namespaces, half-close or back-pressure (a send that
 * would block drops bytes; keep-alive HTTP never fills a socket buffer). Any relay that keeps its
 * promises does at least these system calls per message, so this one's keep-alive rate beside
 * HAProxy's is the most a relay of this design can show on the machine it runs on.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct pair { int fd[2]; };

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int watch(int ep, int fd, struct pair *p, int side) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.u64 = (uintptr_t)p | (unsigned)side};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

int main(int argc, char **argv) {
    static char buf[65536];
    struct epoll_event evs[256];
    struct pair *dead[256]; /* closed in this batch, freed after it: later events may name them */
    int one = 1;
    if (argc != 3) return fprintf(stderr, "usage: floor_relay PORT TARGET_PORT\n"), 2;
    struct sockaddr_in head = loopback(atoi(argv[1])), target = loopback(atoi(argv[2]));
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), ep = epoll_create1(0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct epoll_event lev = {.events = EPOLLIN, .data.u64 = 0};
    if (ls < 0 || ep < 0 || bind(ls, (struct sockaddr *)&head, sizeof head) < 0 || listen(ls, 4096) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev) < 0)
        return perror("floor_relay"), 1;
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1), ndead = 0;
        for (int i = 0; i < n; i++) {
            uint64_t u = evs[i].data.u64;
            if (u == 0) { /* the listener */
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
                    struct pair *p = malloc(sizeof *p);
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if (s < 0 || !p || (connect(s, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) ||
                        watch(ep, fd, p, 0) < 0 || watch(ep, s, p, 1) < 0) {
                        close(fd), close(s), free(p);
                        continue;
                    }
                    p->fd[0] = fd, p->fd[1] = s;
                }
                continue;
            }
            struct pair *p = (struct pair *)(uintptr_t)(u & ~(uint64_t)1);
            int side = (int)(u & 1);
            if (p->fd[0] < 0) continue; /* closed earlier in this batch */
            for (;;) {
                ssize_t r = read(p->fd[side], buf, sizeof buf);
                if (r > 0) {
                    send(p->fd[!side], buf, (size_t)r, MSG_NOSIGNAL);
                    if (r < (ssize_t)sizeof buf) break;
                    continue;
                }
                if (r < 0 && errno == EAGAIN) break;
                close(p->fd[0]), close(p->fd[1]), p->fd[0] = p->fd[1] = -1; /* EOF or error: both go */
                dead[ndead++] = p;
                break;
            }
        }
        while (ndead) free(dead[--ndead]);
    }
}
