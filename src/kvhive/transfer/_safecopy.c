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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

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

static PyMethodDef methods[] = {
    {"copy_rows", (PyCFunction)(void (*)(void))copy_rows, METH_FASTCALL, copy_rows_doc},
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
