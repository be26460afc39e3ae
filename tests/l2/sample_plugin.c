/* A complete kvhive native_plugin (ABI v1): an in-memory object table behind one mutex.
 * Build: gcc -O2 -shared -fPIC -o libsample_plugin.so sample_plugin.c -lpthread
 * Params (JSON given to kvh_open) are ignored.  See kvhive/storage/l2/adapters/native_plugin.py.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { void *base; uint64_t len; } kvh_iov;

typedef struct entry {
    char *key;
    uint8_t *data;
    uint64_t len;
    struct entry *next;
} entry;

#define BUCKETS 4096
typedef struct {
    pthread_mutex_t mu;
    entry *table[BUCKETS];
} store;

static uint64_t hash(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    while (*s) { h ^= (uint8_t)*s++; h *= 1099511628211ULL; }
    return h % BUCKETS;
}

static entry **find(store *st, const char *key) {
    entry **p = &st->table[hash(key)];
    while (*p && strcmp((*p)->key, key) != 0) p = &(*p)->next;
    return p;
}

int kvh_abi_version(void) { return 1; }

void *kvh_open(const char *params_json) {
    (void)params_json;
    store *st = calloc(1, sizeof(store));
    if (st) pthread_mutex_init(&st->mu, NULL);
    return st;
}

void kvh_close(void *h) {
    store *st = h;
    for (int i = 0; i < BUCKETS; i++) {
        entry *e = st->table[i];
        while (e) { entry *n = e->next; free(e->key); free(e->data); free(e); e = n; }
    }
    pthread_mutex_destroy(&st->mu);
    free(st);
}

int kvh_put(void *h, const char *key, const kvh_iov *iov, int iovcnt) {
    store *st = h;
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) len += iov[i].len;
    uint8_t *data = malloc(len ? len : 1);
    if (!data) return -2;
    uint64_t off = 0;
    for (int i = 0; i < iovcnt; i++) { memcpy(data + off, iov[i].base, iov[i].len); off += iov[i].len; }
    pthread_mutex_lock(&st->mu);
    entry **p = find(st, key);
    if (*p) { free((*p)->data); (*p)->data = data; (*p)->len = len; }
    else {
        entry *e = malloc(sizeof(entry));
        e->key = strdup(key); e->data = data; e->len = len; e->next = NULL; *p = e;
    }
    pthread_mutex_unlock(&st->mu);
    return 0;
}

int64_t kvh_get(void *h, const char *key, const kvh_iov *iov, int iovcnt) {
    store *st = h;
    pthread_mutex_lock(&st->mu);
    entry *e = *find(st, key);
    if (!e) { pthread_mutex_unlock(&st->mu); return -1; }
    uint64_t off = 0;
    for (int i = 0; i < iovcnt && off < e->len; i++) {
        uint64_t n = e->len - off < iov[i].len ? e->len - off : iov[i].len;
        memcpy(iov[i].base, e->data + off, n);
        off += n;
    }
    int64_t len = (int64_t)e->len;
    pthread_mutex_unlock(&st->mu);
    return len;
}

int kvh_exists(void *h, const char *key) {
    store *st = h;
    pthread_mutex_lock(&st->mu);
    int found = *find(st, key) != NULL;
    pthread_mutex_unlock(&st->mu);
    return found;
}

int kvh_delete(void *h, const char *key) {
    store *st = h;
    pthread_mutex_lock(&st->mu);
    entry **p = find(st, key);
    int removed = 0;
    if (*p) { entry *e = *p; *p = e->next; free(e->key); free(e->data); free(e); removed = 1; }
    pthread_mutex_unlock(&st->mu);
    return removed;
}
