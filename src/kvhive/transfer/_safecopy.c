/*
 * kvhive.transfer._safecopy -- memcpy batches that survive a SIGBUS.
 *
 * An engine's KV cache lives in a POSIX shared-memory segment that the engine owns.  If
 * the engine truncates (or shrinks) the segment after registering it, every page of our
 * MAP_SHARED mapping past the new end raises SIGBUS when touched, and SIGBUS kills the
 * whole server.  copy_rows() runs a batch of fixed-length memcpy's (a copy plan computed
 * by numpy: one offset per row on each side) inside a per-thread recovery point:
 *
 *     sigsetjmp(jb)  --copy rows-->  done: return None
 *          ^                |
 *          |  SIGBUS on this thread, kernel-raised, while guarded
 *          +--- handler: siglongjmp(jb) --> return the faulting address (int)
 *
 * Only a SIGBUS the kernel raises (si_code > 0) on a thread that is inside copy_rows is
 * absorbed; any other SIGBUS goes to the disposition that was installed before ours (or
 * the default one, which kills the process as it would have without this module).  The
 * handler is (re)installed at each call if someone replaced it (faulthandler does).
 * The copy runs without the GIL, so several threads copy at once.
 *
 * Nothing is allocated or locked between sigsetjmp and the end of the copy, so abandoning
 * a memcpy half-way leaves no state behind; the rows copied before the fault stay copied.
 *
 * copy_blocks() is the paged-KV fast path under the same guard: instead of one int64
 * offset per row (built by numpy for every chunk), it takes a plan made once per
 * registration -- per object plane its segment, block step, object offset and the byte
 * offsets of its rows inside block 0 -- and the chunk's block ids, and computes every
 * row's address itself.  Rows of 16..1024 bytes (a multiple of 16) are copied by fixed-
 * size inlined vector moves instead of a memcpy call per row; a call moving 1 MiB or
 * more (NT_MIN_BYTES) writes aligned rows of a multiple of 64 bytes with non-temporal
 * stores, as glibc's memcpy does for large copies: on the dev box that took 16-chunk
 * gathers from 0.60-0.70x to 0.82-0.86x memcpy and scatters from 0.75x to 0.98x
 * (tests/unit/transfer/bench_paged.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

/* The recovery point of this thread's copy in progress, NULL outside copy_rows. */
static __thread sigjmp_buf *volatile guard_jmp = NULL;
static __thread void *volatile guard_addr = NULL;

static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous_action; /* what was there before our handler */
static volatile sig_atomic_t have_previous = 0;

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    sigjmp_buf *jb = guard_jmp;
    if (jb != NULL && info != NULL && info->si_code > 0) {
        guard_jmp = NULL;
        guard_addr = info->si_addr;
        siglongjmp(*jb, 1);
    }
    /* Not ours: hand the signal to what was installed before (or the default action). */
    if (have_previous && (previous_action.sa_flags & SA_SIGINFO) &&
        previous_action.sa_sigaction != NULL) {
        previous_action.sa_sigaction(sig, info, uctx);
        return;
    }
    if (have_previous && !(previous_action.sa_flags & SA_SIGINFO) &&
        previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
        previous_action.sa_handler(sig);
        return;
    }
    /* Default action: restore it; a fault re-executes the instruction and terminates,
     * a signal sent by someone is raised again. */
    signal(sig, SIG_DFL);
    if (info == NULL || info->si_code <= 0) {
        raise(sig);
    }
}

/* Install on_sigbus unless it is the current SIGBUS handler.  0 on success. */
static int ensure_handler(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        return -1;
    }
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus) {
        return 0;
    }
    int rc = 0;
    pthread_mutex_lock(&install_lock);
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -1;
    } else if (!((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        struct sigaction ours;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_sigbus;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&ours.sa_mask);
        have_previous = 0;
        previous_action = cur;
        have_previous = 1;
        if (sigaction(SIGBUS, &ours, NULL) != 0) {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&install_lock);
    return rc;
}

/* The copy itself, under this thread's recovery point.  Returns 0 when every row was
 * copied, 1 when a page raised SIGBUS (guard_addr holds the address).  Nothing here is
 * read after the jump back but the return value, so no local can be clobbered. */
static __attribute__((noinline)) int guarded_copy(char *dbase, const int64_t *dp,
                                                  const char *sbase, const int64_t *sp,
                                                  Py_ssize_t n, Py_ssize_t row)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1) != 0) {
        return 1; /* the handler cleared guard_jmp */
    }
    guard_jmp = &jb;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t d = dp != NULL ? dp[i] : (int64_t)i * row;
        int64_t s = sp != NULL ? sp[i] : (int64_t)i * row;
        memcpy(dbase + d, sbase + s, (size_t)row);
    }
    guard_jmp = NULL;
    return 0;
}

/* An int64 offset table (or None): a C-contiguous buffer of 8-byte signed integers. */
static int get_offsets(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '=' || *f == '<' || *f == '@') {
        f++;
    }
    if (view->itemsize != 8 || (strcmp(f, "l") != 0 && strcmp(f, "q") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int64 array", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Every offset in [0, limit - row]; -1 with ValueError otherwise. */
static int check_offsets(const int64_t *off, Py_ssize_t n, Py_ssize_t limit, Py_ssize_t row,
                         const char *what)
{
    int64_t hi = (int64_t)limit - (int64_t)row;
    int64_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        bad |= (off[i] < 0) | (off[i] > hi);
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "%s offsets outside the %zd-byte buffer", what, limit);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(copy_rows_doc,
"copy_rows(dst, dst_offsets, src, src_offsets, row_bytes, /) -> None | int\n"
"\n"
"For each i: copy row_bytes bytes from src[src_offsets[i]:] to dst[dst_offsets[i]:].\n"
"An offset table is a C-contiguous int64 array, or None for i * row_bytes (at least one\n"
"must be given; both have the same length).  Every offset is checked against its buffer\n"
"before any byte moves (ValueError).  The copy runs without the GIL.  Returns None when\n"
"every row was copied, or the faulting address when a page of dst or src raised SIGBUS\n"
"(a shared-memory segment shrunk under its mapping); rows before the fault are copied.");

static PyObject *copy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "copy_rows takes 5 arguments");
        return NULL;
    }
    Py_ssize_t row = PyLong_AsSsize_t(args[4]);
    if (row == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (row <= 0) {
        PyErr_SetString(PyExc_ValueError, "row_bytes must be positive");
        return NULL;
    }
    Py_buffer dst = {0}, src = {0}, doff = {0}, soff = {0};
    int have_dst = 0, have_src = 0, have_doff = 0, have_soff = 0;
    PyObject *result = NULL;

    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
        goto done;
    }
    have_dst = 1;
    if (PyObject_GetBuffer(args[2], &src, PyBUF_C_CONTIGUOUS) != 0) {
        goto done;
    }
    have_src = 1;
    if (args[1] != Py_None) {
        if (get_offsets(args[1], &doff, "dst_offsets") != 0) {
            goto done;
        }
        have_doff = 1;
    }
    if (args[3] != Py_None) {
        if (get_offsets(args[3], &soff, "src_offsets") != 0) {
            goto done;
        }
        have_soff = 1;
    }
    if (!have_doff && !have_soff) {
        PyErr_SetString(PyExc_TypeError, "give dst_offsets or src_offsets (or both)");
        goto done;
    }
    Py_ssize_t n = have_doff ? doff.len / 8 : soff.len / 8;
    if (have_doff && have_soff && doff.len != soff.len) {
        PyErr_SetString(PyExc_ValueError, "dst_offsets and src_offsets differ in length");
        goto done;
    }
    const int64_t *dp = have_doff ? (const int64_t *)doff.buf : NULL;
    const int64_t *sp = have_soff ? (const int64_t *)soff.buf : NULL;
    if (dp != NULL && check_offsets(dp, n, dst.len, row, "dst") != 0) {
        goto done;
    }
    if (sp != NULL && check_offsets(sp, n, src.len, row, "src") != 0) {
        goto done;
    }
    if ((dp == NULL && n > dst.len / row) || (sp == NULL && n > src.len / row)) {
        PyErr_SetString(PyExc_ValueError, "more rows than the contiguous side holds");
        goto done;
    }
    if (ensure_handler() != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }

    guard_addr = NULL; /* touch the thread-locals here, never first in the handler */
    guard_jmp = NULL;
    PyThreadState *ts = PyEval_SaveThread();
    int faulted = guarded_copy((char *)dst.buf, dp, (const char *)src.buf, sp, n, row);
    PyEval_RestoreThread(ts);

    if (faulted) {
        result = PyLong_FromVoidPtr(guard_addr);
    } else {
        result = Py_NewRef(Py_None);
    }
done:
    if (have_soff) PyBuffer_Release(&soff);
    if (have_doff) PyBuffer_Release(&doff);
    if (have_src) PyBuffer_Release(&src);
    if (have_dst) PyBuffer_Release(&dst);
    return result;
}

/* ---- copy_blocks: rows addressed by (plane, block, row) ------------------------------ */

/* One row of a compile-time size N (a multiple of 16 up to 1024 when SSE2 is there):
 * unrolled 16-byte moves, no call.  Other sizes: memcpy. */
static inline __attribute__((always_inline)) void copy_row(char *d, const char *s, size_t n)
{
#if HAVE_SSE2
    if (__builtin_constant_p(n) && n % 16 == 0 && n <= 1024) {
        for (size_t i = 0; i < n; i += 64) {
            if (i + 64 <= n) {
                __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
                __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
                __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
                __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
                _mm_storeu_si128((__m128i *)(d + i), a);
                _mm_storeu_si128((__m128i *)(d + i + 16), b);
                _mm_storeu_si128((__m128i *)(d + i + 32), c);
                _mm_storeu_si128((__m128i *)(d + i + 48), e);
            } else {
                for (size_t j = i; j < n; j += 16) {
                    _mm_storeu_si128((__m128i *)(d + j), _mm_loadu_si128((const __m128i *)(s + j)));
                }
            }
        }
        return;
    }
#endif
    memcpy(d, s, n);
}

/* The same with non-temporal stores when the destination row is 16-byte aligned: a
 * large copy's destination is not read again soon, and streaming stores skip reading each
 * destination line into the cache first (half the memory traffic of a plain store).
 * The caller issues an sfence before it returns. */
static inline __attribute__((always_inline)) void copy_row_nt(char *d, const char *s, size_t n)
{
#if HAVE_SSE2
    if (__builtin_constant_p(n) && n % 64 == 0 && n <= 1024 && ((uintptr_t)d & 15) == 0) {
        for (size_t i = 0; i < n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
            _mm_stream_si128((__m128i *)(d + i), a);
            _mm_stream_si128((__m128i *)(d + i + 16), b);
            _mm_stream_si128((__m128i *)(d + i + 32), c);
            _mm_stream_si128((__m128i *)(d + i + 48), e);
        }
        return;
    }
#endif
    copy_row(d, s, n);
}

/* Rows of one (plane, block): q-th row between obj + q * rb and eng + st[q]. */
#define ROWS_CASE(N)                                                                     \
    case N:                                                                              \
        if (to_engine && nt) {                                                           \
            for (Py_ssize_t q = 0; q < nq; q++) copy_row_nt(eng + st[q], obj + q * N, N); \
        } else if (to_engine) {                                                          \
            for (Py_ssize_t q = 0; q < nq; q++) copy_row(eng + st[q], obj + q * N, N);  \
        } else if (nt) {                                                                 \
            for (Py_ssize_t q = 0; q < nq; q++) copy_row_nt(obj + q * N, eng + st[q], N); \
        } else {                                                                         \
            for (Py_ssize_t q = 0; q < nq; q++) copy_row(obj + q * N, eng + st[q], N);  \
        }                                                                                \
        break;

static inline void copy_block_rows(char *obj, char *eng, const int64_t *st, Py_ssize_t nq,
                                   Py_ssize_t rb, int to_engine, int nt)
{
    switch (rb) {
        ROWS_CASE(32)
        ROWS_CASE(64)
        ROWS_CASE(128)
        ROWS_CASE(256)
        ROWS_CASE(512)
        ROWS_CASE(1024)
    default:
        if (to_engine) {
            for (Py_ssize_t q = 0; q < nq; q++) memcpy(eng + st[q], obj + q * rb, (size_t)rb);
        } else {
            for (Py_ssize_t q = 0; q < nq; q++) memcpy(obj + q * rb, eng + st[q], (size_t)rb);
        }
    }
}

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 1
#endif
#define PREFETCH_MAX_ROW 1024

typedef struct {
    char *obj;
    char **segbase;          /* per segment */
    const int64_t *pseg;     /* per plane: segment index */
    const int64_t *pstep;    /* per plane: bytes per block id */
    const int64_t *pobj;     /* per plane: object offset of the plane */
    const int64_t *statics;  /* [planes, nq]: row offsets in block 0 */
    const int64_t *ids;      /* n block ids */
    Py_ssize_t n, first, nq, rb, u0, u1;
    int to_engine;
    int nt; /* streaming stores (a copy of at least NT_MIN_BYTES) */
} blocks_job;

#ifndef NT_MIN_BYTES
#define NT_MIN_BYTES (1 << 20)
#endif

static __attribute__((noinline)) int guarded_blocks(const blocks_job *job)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1) != 0) {
        return 1; /* the handler cleared guard_jmp */
    }
    guard_jmp = &jb;
    const Py_ssize_t n = job->n, nq = job->nq, rb = job->rb;
    const Py_ssize_t block_bytes = nq * rb;
    /* Blocks lie at random places in the engine's segments, a few KiB each: the hardware
     * prefetchers stop at their ends, so the next unit's engine rows are prefetched
     * while this one is copied (short rows only; long rows stream by themselves). */
    const int prefetch = rb <= PREFETCH_MAX_ROW && PREFETCH_AHEAD > 0;
    for (Py_ssize_t u = job->u0; u < job->u1; u++) {
        Py_ssize_t p = u / n, b = u % n;
        char *eng = job->segbase[job->pseg[p]] + job->ids[b] * job->pstep[p];
        char *obj = job->obj + job->pobj[p] + (job->first + b) * block_bytes;
        if (prefetch && u + PREFETCH_AHEAD < job->u1) {
            Py_ssize_t u2 = u + PREFETCH_AHEAD, p2 = u2 / n, b2 = u2 % n;
            const char *e2 = job->segbase[job->pseg[p2]] + job->ids[b2] * job->pstep[p2];
            const int64_t *st2 = job->statics + p2 * nq;
            for (Py_ssize_t q = 0; q < nq; q++) {
                for (Py_ssize_t off = 0; off < rb; off += 64) {
                    if (job->to_engine) {
                        __builtin_prefetch(e2 + st2[q] + off, 1, 3);
                    } else {
                        __builtin_prefetch(e2 + st2[q] + off, 0, 3);
                    }
                }
            }
        }
        copy_block_rows(obj, eng, job->statics + p * nq, nq, rb, job->to_engine, job->nt);
    }
#if HAVE_SSE2
    if (job->nt) {
        _mm_sfence(); /* streaming stores visible before the reply says the copy is done */
    }
#endif
    guard_jmp = NULL;
    return 0;
}

/* A C-contiguous int64 array of exactly `want` items (or any length when want < 0);
 * its length goes to *len. */
static int get_int64s(PyObject *obj, Py_buffer *view, const char *what, Py_ssize_t want,
                      Py_ssize_t *len)
{
    if (get_offsets(obj, view, what) != 0) {
        return -1;
    }
    *len = view->len / 8;
    if (want >= 0 && *len != want) {
        PyErr_Format(PyExc_ValueError, "%s has %zd items, expected %zd", what, *len, want);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(copy_blocks_doc,
"copy_blocks(obj, segments, plane_seg, plane_step, plane_obj, statics, ids, first,\n"
"            blocks_per_chunk, row_bytes, to_engine, u0, u1, /) -> None | int\n"
"\n"
"Copy the rows of units u0 <= u < u1 of a paged-KV chunk, unit u = (plane p = u // n,\n"
"block b = u % n) with n = len(ids).  Row q of unit (p, b) lies at\n"
"    segments[plane_seg[p]] + ids[b] * plane_step[p] + statics[p, q]      (engine side)\n"
"    obj + plane_obj[p] + ((first + b) * Q + q) * row_bytes              (object side)\n"
"and moves engine -> object, or object -> engine when to_engine.  plane_* are int64\n"
"arrays of P items, statics an int64 array of P * Q items, ids an int64 array; segments\n"
"a tuple of buffers (writable when to_engine; obj writable otherwise).  Every address is\n"
"checked against its buffer before any byte moves (ValueError).  Runs without the GIL;\n"
"returns None, or the faulting address when a page raised SIGBUS.");

static PyObject *copy_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "copy_blocks takes 13 arguments");
        return NULL;
    }
    Py_ssize_t sc[6]; /* first, blocks_per_chunk, row_bytes, to_engine, u0, u1 */
    for (int i = 0; i < 6; i++) {
        sc[i] = PyLong_AsSsize_t(args[7 + i]);
        if (sc[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    const Py_ssize_t first = sc[0], nbpc = sc[1], rb = sc[2], u0 = sc[4], u1 = sc[5];
    const int to_engine = sc[3] != 0;
    if (rb <= 0 || first < 0 || nbpc <= 0) {
        PyErr_SetString(PyExc_ValueError, "row_bytes, blocks_per_chunk must be positive, first >= 0");
        return NULL;
    }
    if (!PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "segments must be a tuple");
        return NULL;
    }
    const Py_ssize_t nseg = PyTuple_GET_SIZE(args[1]);
    Py_buffer objv = {0}, pseg = {0}, pstep = {0}, pobj = {0}, stat = {0}, idsv = {0};
    int have_obj = 0, have_pseg = 0, have_pstep = 0, have_pobj = 0, have_stat = 0, have_ids = 0;
    Py_buffer *segv = NULL;
    char **segbase = NULL;
    Py_ssize_t nsegv = 0;
    PyObject *result = NULL;

    if (PyObject_GetBuffer(args[0], &objv, PyBUF_C_CONTIGUOUS | (to_engine ? 0 : PyBUF_WRITABLE)) !=
        0) {
        goto done;
    }
    have_obj = 1;
    segv = PyMem_Calloc(nseg ? nseg : 1, sizeof(Py_buffer));
    segbase = PyMem_Calloc(nseg ? nseg : 1, sizeof(char *));
    if (segv == NULL || segbase == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; nsegv < nseg; nsegv++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(args[1], nsegv), &segv[nsegv],
                               PyBUF_C_CONTIGUOUS | (to_engine ? PyBUF_WRITABLE : 0)) != 0) {
            goto done;
        }
        segbase[nsegv] = (char *)segv[nsegv].buf;
    }
    Py_ssize_t np_, tmp, n, nstat;
    if (get_int64s(args[2], &pseg, "plane_seg", -1, &np_) != 0) goto done;
    have_pseg = 1;
    if (get_int64s(args[3], &pstep, "plane_step", np_, &tmp) != 0) goto done;
    have_pstep = 1;
    if (get_int64s(args[4], &pobj, "plane_obj", np_, &tmp) != 0) goto done;
    have_pobj = 1;
    if (get_int64s(args[5], &stat, "statics", -1, &nstat) != 0) goto done;
    have_stat = 1;
    if (get_int64s(args[6], &idsv, "ids", -1, &n) != 0) goto done;
    have_ids = 1;
    if (np_ <= 0 || nstat <= 0 || nstat % np_ != 0) {
        PyErr_SetString(PyExc_ValueError, "statics must hold the same number of rows per plane");
        goto done;
    }
    const Py_ssize_t nq = nstat / np_;
    const int64_t *ps = pseg.buf, *pst = pstep.buf, *po = pobj.buf, *st = stat.buf;
    const int64_t *ids = idsv.buf;
    int64_t idmax = 0;
    for (Py_ssize_t b = 0; b < n; b++) {
        if (ids[b] < 0) {
            PyErr_Format(PyExc_ValueError, "block id %lld is negative", (long long)ids[b]);
            goto done;
        }
        if (ids[b] > idmax) idmax = ids[b];
    }
    int64_t units, block_bytes, plane_span;
    if (n > nbpc - first || __builtin_mul_overflow((int64_t)np_, (int64_t)n, &units) ||
        u0 < 0 || u1 < u0 || u1 > units) {
        PyErr_SetString(PyExc_ValueError, "block range or unit range outside the chunk");
        goto done;
    }
    if (__builtin_mul_overflow((int64_t)nq, (int64_t)rb, &block_bytes) ||
        __builtin_mul_overflow(block_bytes, (int64_t)nbpc, &plane_span)) {
        PyErr_SetString(PyExc_ValueError, "plane too large");
        goto done;
    }
    for (Py_ssize_t p = 0; p < np_; p++) {
        int64_t end, reach;
        if (ps[p] < 0 || ps[p] >= nseg) {
            PyErr_Format(PyExc_ValueError, "plane %zd names segment %lld of %zd", p,
                         (long long)ps[p], nseg);
            goto done;
        }
        if (po[p] < 0 || __builtin_add_overflow(po[p], plane_span, &end) || end > objv.len) {
            PyErr_Format(PyExc_ValueError, "plane %zd outside the %zd-byte object", p, objv.len);
            goto done;
        }
        int64_t lo = st[p * nq], hi = st[p * nq];
        for (Py_ssize_t q = 1; q < nq; q++) {
            int64_t v = st[p * nq + q];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        if (lo < 0 || pst[p] < 0 || __builtin_mul_overflow(idmax, pst[p], &reach) ||
            __builtin_add_overflow(reach, hi, &end) || __builtin_add_overflow(end, rb, &end) ||
            end > segv[ps[p]].len) {
            PyErr_Format(PyExc_ValueError, "plane %zd rows outside the %zd-byte segment", p,
                         segv[ps[p]].len);
            goto done;
        }
    }
    if (ensure_handler() != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    blocks_job job = {
        .obj = (char *)objv.buf, .segbase = segbase, .pseg = ps, .pstep = pst, .pobj = po,
        .statics = st, .ids = ids, .n = n, .first = first, .nq = nq, .rb = rb,
        .u0 = u0, .u1 = u1, .to_engine = to_engine,
        .nt = (u1 - u0) * nq * rb >= NT_MIN_BYTES,
    };
    int faulted = 0;
    if (u1 > u0) {
        guard_addr = NULL; /* touch the thread-locals here, never first in the handler */
        guard_jmp = NULL;
        PyThreadState *ts = PyEval_SaveThread();
        faulted = guarded_blocks(&job);
        PyEval_RestoreThread(ts);
    }
    result = faulted ? PyLong_FromVoidPtr(guard_addr) : Py_NewRef(Py_None);
done:
    if (have_ids) PyBuffer_Release(&idsv);
    if (have_stat) PyBuffer_Release(&stat);
    if (have_pobj) PyBuffer_Release(&pobj);
    if (have_pstep) PyBuffer_Release(&pstep);
    if (have_pseg) PyBuffer_Release(&pseg);
    for (Py_ssize_t i = 0; i < nsegv; i++) PyBuffer_Release(&segv[i]);
    PyMem_Free(segv);
    PyMem_Free(segbase);
    if (have_obj) PyBuffer_Release(&objv);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_rows", (PyCFunction)(void (*)(void))copy_rows, METH_FASTCALL, copy_rows_doc},
    {"copy_blocks", (PyCFunction)(void (*)(void))copy_blocks, METH_FASTCALL, copy_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "kvhive.transfer._safecopy",
    "memcpy batches that return an error instead of dying when a mapped page raises SIGBUS.",
    -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__safecopy(void)
{
    return PyModule_Create(&module);
}
