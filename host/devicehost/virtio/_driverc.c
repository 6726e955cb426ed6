/* SPDX-License-Identifier: MIT
 *
 * devicehost.virtio._driverc: the hot paths of the guest-side virtqueue driver
 * (devicehost/virtio/driverqueue.py, DriverQueue) in C.
 *
 * This module is an optional accelerator. A Queue object works on the state of one DriverQueue
 * (its __dict__: avail_idx, last_used, _spare_pages, _kicked_at, kicks, kick_doorbell; its free
 * list, in-flight dict and spare dict, which Python never rebinds) and its ring memory, and
 * implements only the common case of each operation:
 *
 *   add_readable(first, second=None, token=None): exact bytes, bytearray or contiguous 1-D
 *       memoryviews of format "B"; enough free descriptors; a spare block of the right page
 *       count. The buffers are copied into the block, the descriptors and the avail entry are
 *       written, and the avail idx is published.
 *   add_segments(header, data, segment, length_at): the same buffer types and exact ints; one
 *       chain (header with the piece's length patched in, piece) per piece while two
 *       descriptors and a spare block are free, the avail idx published once.
 *   add_writable_many(count, size): exact ints; as many buffers as the spare lists hold blocks
 *       for (the rest is passed to Python, which allocates).
 *   reap() / take_used_views(): used entries whose head is in flight, whose written length is
 *       within the chain's writable space, whose block goes back to the spare lists (not to the
 *       allocator) and, for views, whose writable part is the buffer's whole view or a list of
 *       one view.
 *   kick(): the event-index / NO_NOTIFY decision, then kick_doorbell.ring().
 *
 * Whatever is unusual (another argument type, a full queue, no spare block, a device that lies
 * about a head or a length, a multi-part chain, state that is not what DriverQueue writes) is
 * DECLINED: the call, or the rest of a batch, goes unchanged to the pure-Python method, which
 * checks everything again and raises the precise error. This module never raises a driver error
 * itself; tests/virtio/test_driverc.py runs the same operations through both and compares
 * return values, errors, guest memory and the queue's state.
 *
 * Layout (facts: virtio 1.x split queue; little-endian, which this module requires):
 *   descriptor: le64 addr, le32 len, le16 flags (NEXT 1, WRITE 2), le16 next
 *   avail: le16 flags, le16 idx, le16 ring[size], le16 used_event
 *   used:  le16 flags (NO_NOTIFY 1), le16 idx, {le32 id, le32 len} ring[size], le16 avail_event
 *
 * Memory ordering (the device may be another process, e.g. vhost-user): descriptors and the
 * avail entry are written with plain stores, then the avail idx is published with a RELEASE
 * store, so the device that ACQUIRE-loads the idx sees them. The used idx is read once with an
 * ACQUIRE load before the used elements it covers; each element (id, len) is loaded once into
 * locals and only those are validated and used (no second read of device-owned memory).
 * used_event is stored with RELEASE. kick() issues a SEQ_CST fence between the published avail
 * idx and its load of avail_event / used flags, so neither side misses the other's update.
 *
 * Files: this one holds the module, the Queue type (init, GC, close, the method table) and
 * kick(); _driverc_post.c the posting methods; _driverc_collect.c reap / take_used_views;
 * _driverc.h the QueueObject, the constants and the inline helpers they share.
 */
#include "_driverc.h"

/* Set once by PyInit__driverc; read by every file (see _driverc.h). */
DrivercKeys driverc_key;
PyObject *driverc_int_zero;

/* kick() -> bool */
static PyObject *
Queue_kick(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        return call_fallback(self, FB_KICK, NULL, 0, NULL);
    Py_ssize_t avail_idx = state_index(self, driverc_key.avail_idx, 0xFFFF);
    Py_ssize_t kicked_at = state_index(self, driverc_key.kicked_at, 0xFFFF);
    Py_ssize_t kicks = state_index(self, driverc_key.kicks, PY_SSIZE_T_MAX - 1);
    PyObject *doorbell = PyDict_GetItemWithError(self->state, driverc_key.kick_doorbell);
    if (avail_idx < 0 || kicked_at < 0 || kicks < 0 || doorbell == NULL) {
        PyErr_Clear();
        return call_fallback(self, FB_KICK, NULL, 0, NULL);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int needed;
    if (self->event_idx) {
        uint16_t avail_event = __atomic_load_n(used_word(self, 2 + 4 * self->size),
                                               __ATOMIC_ACQUIRE);
        needed = ((avail_idx - avail_event - 1) & 0xFFFF) < ((avail_idx - kicked_at) & 0xFFFF);
    } else {
        needed = !(__atomic_load_n(used_word(self, 0), __ATOMIC_ACQUIRE) & RING_F_NO_NOTIFY);
    }
    if (state_set(self, driverc_key.kicked_at, avail_idx) < 0)
        return NULL;
    if (needed) {
        if (state_set(self, driverc_key.kicks, kicks + 1) < 0)
            return NULL;
        Py_INCREF(doorbell);
        PyObject *rung = PyObject_CallMethodNoArgs(doorbell, driverc_key.ring);
        Py_DECREF(doorbell);
        if (rung == NULL)
            return NULL;
        Py_DECREF(rung);
    }
    return PyBool_FromLong(needed);
}

static int
take_buffer(PyObject *obj, Py_buffer *view, int *held, Py_ssize_t min_len, int align)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *held = 1;
    if (view->len < min_len || ((uintptr_t)view->buf & (uintptr_t)(align - 1))) {
        PyErr_SetString(PyExc_ValueError, "a ring area is too small or misaligned");
        return -1;
    }
    return 0;
}

static PyObject *
state_object(PyObject *state, PyObject *key, PyTypeObject *type)
{
    PyObject *obj = PyDict_GetItemWithError(state, key);
    if (obj == NULL || Py_TYPE(obj) != type) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "the queue's %U is missing or not a %s", key,
                         type->tp_name);
        return NULL;
    }
    return Py_NewRef(obj);
}

/* Queue(state, desc, avail, used, size, event_idx, spare_max, no_views, fallbacks) */
static int
Queue_init(QueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"state", "desc", "avail", "used", "size", "event_idx", "spare_max",
                             "no_views", "fallbacks", NULL};
    PyObject *state, *desc, *avail, *used, *no_views, *fallbacks;
    Py_ssize_t size, spare_max;
    int event_idx;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOnpnO!O!", kwlist, &PyDict_Type, &state,
                                     &desc, &avail, &used, &size, &event_idx, &spare_max,
                                     &PyList_Type, &no_views, &PyTuple_Type, &fallbacks))
        return -1;
    if (self->state != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Queue is initialised once");
        return -1;
    }
    if (size < 1 || size > 32768 || spare_max < 0 || PyTuple_GET_SIZE(fallbacks) != N_FALLBACKS) {
        PyErr_SetString(PyExc_ValueError, "unusable queue size, spare bound or fallbacks");
        return -1;
    }
    for (int i = 0; i < N_FALLBACKS; i++) {
        if (!PyCallable_Check(PyTuple_GET_ITEM(fallbacks, i))) {
            PyErr_SetString(PyExc_TypeError, "fallbacks must be callables");
            return -1;
        }
    }
    if (take_buffer(desc, &self->desc, &self->has_desc, 16 * size, 8) < 0
        || take_buffer(avail, &self->avail, &self->has_avail, 6 + 2 * size, 2) < 0
        || take_buffer(used, &self->used, &self->has_used, 6 + 8 * size, 4) < 0)
        return -1;
    self->free = state_object(state, driverc_key.free, &PyList_Type);
    self->in_flight = self->free ? state_object(state, driverc_key.in_flight, &PyDict_Type) : NULL;
    self->spare = self->in_flight ? state_object(state, driverc_key.spare, &PyDict_Type) : NULL;
    if (self->spare == NULL)
        return -1;
    self->state = Py_NewRef(state);
    self->no_views = Py_NewRef(no_views);
    for (int i = 0; i < N_FALLBACKS; i++)
        self->fallback[i] = Py_NewRef(PyTuple_GET_ITEM(fallbacks, i));
    self->size = size;
    self->spare_max = spare_max;
    self->event_idx = event_idx;
    return 0;
}

static int
Queue_traverse(QueueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->state);
    Py_VISIT(self->free);
    Py_VISIT(self->in_flight);
    Py_VISIT(self->spare);
    Py_VISIT(self->no_views);
    for (int i = 0; i < N_FALLBACKS; i++)
        Py_VISIT(self->fallback[i]);
    return 0;
}

static int
Queue_clear(QueueObject *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->free);
    Py_CLEAR(self->in_flight);
    Py_CLEAR(self->spare);
    Py_CLEAR(self->no_views);
    for (int i = 0; i < N_FALLBACKS; i++)
        Py_CLEAR(self->fallback[i]);
    self->closed = 1;
    return 0;
}

static void
release_buffers(QueueObject *self)
{
    if (self->has_desc)
        PyBuffer_Release(&self->desc);
    if (self->has_avail)
        PyBuffer_Release(&self->avail);
    if (self->has_used)
        PyBuffer_Release(&self->used);
    self->has_desc = self->has_avail = self->has_used = 0;
}

/* close(): release the ring memory; every method then passes its call to Python. */
static PyObject *
Queue_close(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    self->closed = 1;
    release_buffers(self);
    Py_RETURN_NONE;
}

static void
Queue_dealloc(QueueObject *self)
{
    PyObject_GC_UnTrack(self);
    Queue_clear(self);
    release_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Queue_methods[] = {
    {"add_readable", (PyCFunction)(void (*)(void))driverc_add_readable,
     METH_FASTCALL | METH_KEYWORDS, "add_readable(first, second=None, token=None) -> head"},
    {"add_segments", (PyCFunction)(void (*)(void))driverc_add_segments,
     METH_FASTCALL | METH_KEYWORDS, "add_segments(header, data, segment, length_at) -> posted"},
    {"add_writable_many", (PyCFunction)(void (*)(void))driverc_add_writable_many,
     METH_FASTCALL | METH_KEYWORDS, "add_writable_many(count, size) -> posted"},
    {"reap", (PyCFunction)driverc_reap, METH_NOARGS, "reap() -> count"},
    {"take_used_views", (PyCFunction)driverc_take_used_views, METH_NOARGS,
     "take_used_views() -> [(written, view)]"},
    {"kick", (PyCFunction)Queue_kick, METH_NOARGS, "kick() -> bool"},
    {"close", (PyCFunction)Queue_close, METH_NOARGS, "close(): release the ring memory"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "devicehost.virtio._driverc.Queue",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Queue_traverse,
    .tp_clear = (inquiry)Queue_clear,
    .tp_doc = "Queue(state, desc, avail, used, size, event_idx, spare_max, no_views, fallbacks):"
              " the fast paths of one DriverQueue.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
};

static struct PyModuleDef driverc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "devicehost.virtio._driverc",
    .m_doc = "Optional C fast paths of devicehost.virtio.driverqueue (the common chains).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__driverc(void)
{
    if (PyType_Ready(&QueueType) < 0)
        return NULL;
    struct { PyObject **slot; const char *name; } keys[] = {
        {&driverc_key.avail_idx, "avail_idx"}, {&driverc_key.last_used, "last_used"},
        {&driverc_key.spare_pages, "_spare_pages"}, {&driverc_key.kicked_at, "_kicked_at"},
        {&driverc_key.kicks, "kicks"}, {&driverc_key.kick_doorbell, "kick_doorbell"},
        {&driverc_key.ring, "ring"}, {&driverc_key.second, "second"},
        {&driverc_key.token, "token"}, {&driverc_key.free, "_free"},
        {&driverc_key.in_flight, "_in_flight"}, {&driverc_key.spare, "_spare"},
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if (*keys[i].slot == NULL && (*keys[i].slot = PyUnicode_InternFromString(keys[i].name)) == NULL)
            return NULL;
    }
    if (driverc_int_zero == NULL && (driverc_int_zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&driverc_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
