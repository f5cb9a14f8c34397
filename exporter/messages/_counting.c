/* Compiled message counting for exporter/messages/ (library mode, `messages=True`).
 *
 * The pure-Python counting wrapper costs ~0.5 us per message (two Python frames, and recv
 * must learn RCVMORE through a Frame or pyzmq's getsockopt). Here the same wrapper is two
 * small callables that the counted socket's class holds as `send` and `recv`: each
 * forwards the application's call unchanged to pyzmq's own method (vectorcall, no tuple or
 * dict built), then adds to a `Counts` in C integers. RCVMORE is read straight from the
 * libzmq that pyzmq loaded (zmq_getsockopt on the socket's handle), found at import.
 *
 * Behaviour is exactly exporter/messages/__init__.py's Python wrapper (which stays as the fallback when no
 * compiler was available at install, and as the reference the tests compare against):
 * - send: a blocking send is tried once with NOBLOCK; only if that meets backpressure is the
 *   real (blocking) send made and timed into blocked_seconds. zmq.Again from a send counts
 *   as would_block (not for a socket made with waits=False: an asyncio socket's shadow).
 *   On success: bytes_sent += payload bytes, sent += 1 unless SNDMORE.
 * - recv / recv_into: on success bytes_received += frame size (the bytes, Frame or the
 *   int recv_into returns); received += 1 unless RCVMORE.
 *
 * Both types are method descriptors (Py_TPFLAGS_METHOD_DESCRIPTOR): `sock.send(x)` calls
 * them with the socket first, without a bound-method object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <dlfcn.h>
#include <link.h>
#include <string.h>
#include <time.h>

/* libzmq's stable ABI values (zmq.h). */
#define ZMQ_NOBLOCK 1
#define ZMQ_SNDMORE 2
#define ZMQ_RCVMORE 13
#define ZMQ_TYPE 16

typedef int (*getsockopt_fn)(void *socket, int option, void *value, size_t *size);

static getsockopt_fn zmq_getsockopt_ptr = NULL;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter reads on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- Counts ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    unsigned long long sent;
    unsigned long long received;
    unsigned long long bytes_sent;
    unsigned long long bytes_received;
    unsigned long long would_block;
    double blocked_seconds;
} CountsObject;

static PyMemberDef counts_members[] = {
    {"sent", T_ULONGLONG, offsetof(CountsObject, sent), 0, "whole messages sent"},
    {"received", T_ULONGLONG, offsetof(CountsObject, received), 0, "whole messages received"},
    {"bytes_sent", T_ULONGLONG, offsetof(CountsObject, bytes_sent), 0, "payload bytes sent"},
    {"bytes_received", T_ULONGLONG, offsetof(CountsObject, bytes_received), 0,
     "payload bytes received"},
    {"would_block", T_ULONGLONG, offsetof(CountsObject, would_block), 0,
     "sends that raised zmq.Again"},
    {"blocked_seconds", T_DOUBLE, offsetof(CountsObject, blocked_seconds), 0,
     "seconds inside sends that met backpressure"},
    {NULL},
};

static PyTypeObject CountsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter.messages._counting.Counts",
    .tp_basicsize = sizeof(CountsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "One socket's message counts, in C integers (messages.MessageCounts' storage).",
    .tp_members = counts_members,
    .tp_new = PyType_GenericNew,
};

/* ---- what both callables share: the struct, forwarding, introspection, lifetime ----- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    CountsObject *counts;
    PyObject *base;   /* the class's own method: what the application's call reaches */
    PyObject *direct; /* Sender: called in the NOBLOCK first try (pyzmq's compiled send) */
    PyObject *again;  /* Sender: zmq.Again */
    int waits;        /* Sender: time blocking sends, count zmq.Again */
} CallableObject;


static PyObject *callable_get(PyObject *self, PyObject *obj, PyObject *type) {
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

/* __name__, __qualname__, __doc__, __module__: the wrapped method's, as functools.wraps. */
static PyObject *forward_attr(PyObject *self, void *name) {
    return PyObject_GetAttrString(((CallableObject *)self)->base, (const char *)name);
}

static PyGetSetDef callable_getset[] = {
    {"__name__", forward_attr, NULL, NULL, "__name__"},
    {"__qualname__", forward_attr, NULL, NULL, "__qualname__"},
    {"__doc__", forward_attr, NULL, NULL, "__doc__"},
    {"__module__", forward_attr, NULL, NULL, "__module__"},
    {NULL},
};

static PyObject *callable_repr(PyObject *self) {
    return PyUnicode_FromFormat("<counting %R>", ((CallableObject *)self)->base);
}

static int callable_traverse(PyObject *op, visitproc visit, void *arg) {
    CallableObject *self = (CallableObject *)op;
    Py_VISIT(self->counts);
    Py_VISIT(self->base);
    Py_VISIT(self->direct);
    Py_VISIT(self->again);
    return 0;
}

static int callable_clear(PyObject *op) {
    CallableObject *self = (CallableObject *)op;
    Py_CLEAR(self->counts);
    Py_CLEAR(self->base);
    Py_CLEAR(self->direct);
    Py_CLEAR(self->again);
    return 0;
}

static void callable_dealloc(PyObject *op) {
    PyObject_GC_UnTrack(op);
    callable_clear(op);
    Py_TYPE(op)->tp_free(op);
}

static PyMemberDef callable_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(CallableObject, base), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(CallableObject, vectorcall), READONLY, NULL},
    {NULL},
};

static PyObject *callable_make(PyTypeObject *type, vectorcallfunc vectorcall, PyObject *counts,
                               PyObject *base, PyObject *direct, PyObject *again, int waits) {
    CallableObject *self = (CallableObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = vectorcall;
    Py_INCREF(counts);
    self->counts = (CountsObject *)counts;
    Py_INCREF(base);
    self->base = base;
    Py_XINCREF(direct);
    self->direct = direct;
    Py_XINCREF(again);
    self->again = again;
    self->waits = waits;
    return (PyObject *)self;
}

/* Sender and Receiver: method descriptors called with the socket first (no bound method). */
#define CALLABLE_TYPE(NAME, NEW)                                                             \
    {                                                                                        \
        PyVarObject_HEAD_INIT(NULL, 0)                                                       \
        .tp_name = "exporter.messages._counting." NAME,                                      \
        .tp_basicsize = sizeof(CallableObject),                                              \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |   \
                    Py_TPFLAGS_METHOD_DESCRIPTOR,                                            \
        .tp_vectorcall_offset = offsetof(CallableObject, vectorcall),                        \
        .tp_call = PyVectorcall_Call, .tp_descr_get = callable_get, .tp_repr = callable_repr, \
        .tp_traverse = callable_traverse, .tp_clear = callable_clear,                        \
        .tp_dealloc = callable_dealloc, .tp_getset = callable_getset,                        \
        .tp_members = callable_members, .tp_new = NEW,                                       \
    }

/* ---- Sender ------------------------------------------------------------------------ */

/* send()'s parameters after the socket: data, flags, copy, track; interned at import, so
   the usual keyword (a caller's interned name) is found by identity. */
static const char *const send_params[] = {"data", "flags", "copy", "track"};
static PyObject *send_param_names[4] = {NULL, NULL, NULL, NULL};

static Py_ssize_t payload_bytes(PyObject *data) {
    if (PyBytes_CheckExact(data)) {
        return PyBytes_GET_SIZE(data);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_FULL_RO) == 0) { /* what memoryview() asks */
        Py_ssize_t n = view.len;
        PyBuffer_Release(&view);
        return n;
    }
    PyErr_Clear(); /* sent, but not a buffer we can size */
    return 0;
}

/* The send as asked (the application's own arguments), timed unless NOBLOCK. */
static PyObject *send_waiting(CallableObject *self, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames, long flags, int flags_known) {
    CountsObject *c = self->counts;
    if (!self->waits) {
        return PyObject_Vectorcall(self->base, args, nargsf, kwnames);
    }
    int timed = !(flags_known && (flags & ZMQ_NOBLOCK));
    double start = timed ? now() : 0.0;
    PyObject *result = PyObject_Vectorcall(self->base, args, nargsf, kwnames);
    if (result == NULL && PyErr_ExceptionMatches(self->again)) {
        c->would_block++; /* NOBLOCK with no room, or SNDTIMEO expired */
    }
    if (timed) {
        c->blocked_seconds += now() - start;
    }
    return result;
}

static PyObject *sender_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    CallableObject *self = (CallableObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* sock, data, flags, copy, track; `other`: keywords pyzmq's sugar handles itself
       (routing_id, group), or arguments it will refuse: the call goes to it unchanged. */
    PyObject *slot[5] = {NULL, NULL, NULL, NULL, NULL};
    int other = nargs > 5;
    for (Py_ssize_t i = 0; i < nargs && i < 5; i++) {
        slot[i] = args[i];
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            int found = -1;
            for (int p = 0; p < 4 && found < 0; p++) {
                if (name == send_param_names[p]) {
                    found = p + 1;
                }
            }
            for (int p = 0; p < 4 && found < 0; p++) { /* a name built at run time */
                if (PyUnicode_CompareWithASCIIString(name, send_params[p]) == 0) {
                    found = p + 1;
                }
            }
            if (found < 0 || slot[found] != NULL) {
                other = 1;
            } else {
                slot[found] = args[nargs + k];
            }
        }
    }
    long flags = 0;
    int flags_known = 1;
    if (slot[2] != NULL) {
        flags_known = PyLong_Check(slot[2]);
        if (flags_known) {
            flags = PyLong_AsLong(slot[2]);
            if (flags == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                flags = 0;
                flags_known = 0;
            }
        }
    }
    PyObject *result;
    if (!other && flags_known && self->waits && !(flags & ZMQ_NOBLOCK) && slot[0] != NULL &&
        slot[1] != NULL) {
        /* Without waiting first: only a send that meets backpressure reads the clock. */
        PyObject *first_try[5] = {slot[0], slot[1], NULL, slot[3] ? slot[3] : Py_True,
                                  slot[4] ? slot[4] : Py_False};
        first_try[2] = PyLong_FromLong(flags | ZMQ_NOBLOCK);
        if (first_try[2] == NULL) {
            return NULL;
        }
        result = PyObject_Vectorcall(self->direct, first_try, 5, NULL);
        Py_DECREF(first_try[2]);
        if (result == NULL) {
            if (!PyErr_ExceptionMatches(self->again)) {
                return NULL;
            }
            PyErr_Clear();
            result = send_waiting(self, args, nargsf, kwnames, flags, flags_known);
        }
    } else {
        result = send_waiting(self, args, nargsf, kwnames, flags, flags_known);
    }
    if (result == NULL) {
        return NULL;
    }
    CountsObject *c = self->counts;
    if (slot[1] != NULL) {
        c->bytes_sent += (unsigned long long)payload_bytes(slot[1]);
    }
    if (!(flags & ZMQ_SNDMORE)) {
        c->sent++;
    }
    return result;
}

static PyObject *sender_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"counts", "base", "direct", "again", "waits", NULL};
    PyObject *counts, *base, *direct, *again;
    int waits;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOOp:Sender", names, &CountsType,
                                     &counts, &base, &direct, &again, &waits)) {
        return NULL;
    }
    return callable_make(type, sender_vectorcall, counts, base, direct, again, waits);
}

static PyTypeObject SenderType = CALLABLE_TYPE("Sender", sender_new);

/* ---- Receiver ---------------------------------------------------------------------- */

static PyObject *underlying_name = NULL; /* "underlying", interned at import */

static PyObject *receiver_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    CallableObject *self = (CallableObject *)callable;
    PyObject *result = PyObject_Vectorcall(self->base, args, nargsf, kwnames);
    if (result == NULL) {
        return NULL;
    }
    Py_ssize_t size;
    if (PyBytes_CheckExact(result)) {
        size = PyBytes_GET_SIZE(result);
    } else if (PyLong_Check(result)) { /* recv_into: the frame's size as libzmq reports it */
        size = PyLong_AsSsize_t(result);
    } else { /* a Frame (copy=False) */
        size = PyObject_Size(result);
    }
    if (size < 0) {
        PyErr_Clear();
        size = 0;
    }
    CountsObject *c = self->counts;
    c->bytes_received += (unsigned long long)size;
    /* The frame just received came off this socket, on this thread: its RCVMORE is the
       socket's until the next recv. The handle is read from the socket the call was made
       on (a shadow of another address may share this class), after the recv succeeded:
       so the socket is open. (A socket closed by another thread meanwhile breaks libzmq's
       own rule, one thread per socket, before it breaks this.) */
    int more = 0;
    void *handle = NULL;
    if (PyVectorcall_NARGS(nargsf) > 0) {
        PyObject *underlying = PyObject_GetAttr(args[0], underlying_name);
        if (underlying != NULL) {
            handle = PyLong_AsVoidPtr(underlying);
            Py_DECREF(underlying);
        }
        if (PyErr_Occurred()) {
            PyErr_Clear();
            handle = NULL;
        }
    }
    size_t more_size = sizeof more;
    if (handle == NULL || zmq_getsockopt_ptr(handle, ZMQ_RCVMORE, &more, &more_size) != 0) {
        more = 0;
    }
    if (!more) {
        c->received++;
    }
    return result;
}

static PyObject *receiver_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"counts", "base", NULL};
    PyObject *counts, *base;
    if (zmq_getsockopt_ptr == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "libzmq was not found in this process");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O:Receiver", names, &CountsType,
                                     &counts, &base)) {
        return NULL;
    }
    return callable_make(type, receiver_vectorcall, counts, base, NULL, NULL, 0);
}

static PyTypeObject ReceiverType = CALLABLE_TYPE("Receiver", receiver_new);

/* ---- finding pyzmq's libzmq ------------------------------------------------------- */

typedef struct {
    int found;
    char path[4096];
} LibzmqSearch;

static int find_libzmq(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    LibzmqSearch *search = (LibzmqSearch *)data;
    const char *name = info->dlpi_name;
    if (name == NULL || name[0] == '\0') {
        return 0;
    }
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    /* pyzmq's wheels: libzmq-<hash>.so.5...; a system libzmq: libzmq.so.5 */
    if (strncmp(base, "libzmq-", 7) == 0 || strncmp(base, "libzmq.so", 9) == 0) {
        search->found++;
        if (search->found == 1 && strlen(name) < sizeof search->path) {
            strcpy(search->path, name);
        }
    }
    return 0;
}

/* The path of the one libzmq loaded in this process, or None (none, or more than one:
   a handle of one copy must not go to another's zmq_getsockopt). */
static PyObject *bind_libzmq(void) {
    LibzmqSearch search = {0, {0}};
    dl_iterate_phdr(find_libzmq, &search);
    if (search.found != 1) {
        Py_RETURN_NONE;
    }
    void *lib = dlopen(search.path, RTLD_LAZY | RTLD_NOLOAD); /* kept: pyzmq holds it too */
    if (lib == NULL) {
        Py_RETURN_NONE;
    }
    zmq_getsockopt_ptr = (getsockopt_fn)dlsym(lib, "zmq_getsockopt");
    if (zmq_getsockopt_ptr == NULL) {
        Py_RETURN_NONE;
    }
    return PyUnicode_DecodeFSDefault(search.path);
}

static PyObject *socket_type(PyObject *module, PyObject *handle_obj) {
    (void)module;
    void *handle = PyLong_AsVoidPtr(handle_obj);
    if (handle == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyLong_FromLong(-1);
    }
    int value = -1;
    size_t value_size = sizeof value;
    if (zmq_getsockopt_ptr == NULL ||
        zmq_getsockopt_ptr(handle, ZMQ_TYPE, &value, &value_size) != 0) {
        value = -1;
    }
    return PyLong_FromLong(value);
}

static PyMethodDef module_methods[] = {
    {"socket_type", socket_type, METH_O,
     "socket_type(handle) -> the socket's ZMQ_TYPE as read through the libzmq found at "
     "import, or -1: the check that a handle belongs to that libzmq."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "exporter.messages._counting",
    .m_doc = "Compiled message counting for exporter.messages (see its docstring).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__counting(void) {
    if (PyType_Ready(&CountsType) < 0 || PyType_Ready(&SenderType) < 0 ||
        PyType_Ready(&ReceiverType) < 0) {
        return NULL;
    }
    underlying_name = PyUnicode_InternFromString("underlying");
    if (underlying_name == NULL) {
        return NULL;
    }
    for (int p = 0; p < 4; p++) {
        send_param_names[p] = PyUnicode_InternFromString(send_params[p]);
        if (send_param_names[p] == NULL) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    PyObject *libzmq = bind_libzmq();
    if (libzmq == NULL || PyModule_AddObject(module, "libzmq", libzmq) < 0) {
        Py_XDECREF(libzmq);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&CountsType);
    Py_INCREF(&SenderType);
    Py_INCREF(&ReceiverType);
    if (PyModule_AddObject(module, "Counts", (PyObject *)&CountsType) < 0 ||
        PyModule_AddObject(module, "Sender", (PyObject *)&SenderType) < 0 ||
        PyModule_AddObject(module, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
