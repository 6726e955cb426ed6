/* SPDX-License-Identifier: MIT
 *
 * devicehost.virtio._queuec: the hot paths of the device side of the split virtqueue
 * (devicehost/virtio/queue.py, SplitQueue) in C.
 *
 * This module is an optional accelerator. It covers only the common case:
 *
 * - pop / pop_many: popping direct descriptor chains whose buffers all lie in the one region of
 *   a single-region guest memory, building the DescriptorChain objects itself;
 * - used_many: writing a batch of valid used elements and publishing the used index;
 * - should_interrupt: the barrier and the look at the driver's used_event / avail.flags;
 * - the in-flight table (optional, `track`: one uint32 per head, queue.py's): a chain popped
 *   here sets its head's entry to IN_FLIGHT | the avail position it was popped at, a used
 *   element written here clears it (queue.py does the same on its own paths).
 *
 * It DECLINES (returns "not handled" to queue.py, which takes its pure-Python path, checks
 * everything again and raises the precise QueueError / ValueError) on anything unusual: a head
 * >= the queue size, an avail index more than the queue size ahead (a lie), an indirect
 * descriptor, a buffer outside the region (or wrapping around 2**64), a descriptor loop (more
 * descriptors than the table has), a device-readable descriptor after a writable one, a next
 * index out of range, a chain longer than MAX_FAST_DESCRIPTORS descriptors, a chain of more than
 * 2**32-1 bytes, a released memory region; for used_many any head or length that is not an int in
 * range, a length count that does not match, or containers that are not lists or tuples. So this
 * module never raises a queue error itself and never decides anything queue.py would decide
 * differently; tests/virtio/test_queuec.py runs the same operations through both and compares
 * return values, exceptions and every byte of guest memory. Multi-region memory is never bound.
 *
 * Memory ordering (the driver may be another process sharing guest memory, e.g. vhost-user):
 * - avail.idx is loaded ONCE per refill with an acquire load; the ring entries and descriptors
 *   read after it were written by the driver before it published that index.
 * - every guest-owned word (avail ring entry, each descriptor's 16 bytes) is loaded ONCE into
 *   locals; only the locals are validated and used (no time-of-check/time-of-use gap). The
 *   buffers themselves are handed out as views; their contents are the device's to interpret.
 * - used elements are written with plain stores, then used.idx is published with a release
 *   store, so the driver never sees the index before the elements. The full barrier between that
 *   store and the load of the driver's used_event / avail.flags is a seq_cst fence
 *   (should_interrupt), so neither side can miss the other's notification.
 * - pop stores avail_event (EVENT_IDX, notifications on) with a release store after the chain was
 *   read; pop_many leaves that single store to queue.py, after the batch.
 * Everything is little-endian; this module refuses to compile on a big-endian machine.
 *
 * Chains are built without running Python code: the DescriptorChain class is checked when a
 * Queue is bound (a plain slotted class whose tp_new is object's, its six slots plain writable
 * object members inside the instance); instances are allocated with tp_alloc and the slots set
 * through the member offsets, exactly what DescriptorChain._of does. Each buffer view is a
 * memoryview sharing the region memoryview's managed buffer (so it keeps the mapping alive, has
 * the same .obj, format 'B' and flags as the slice queue.py takes), narrowed to its range.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the virtio ring layout is little-endian"
#endif

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define MAX_CHAIN_BYTES 0xFFFFFFFFull
#define MAX_FAST_DESCRIPTORS 64
#define DECLINED ((long long)1 << 32)
#define IN_FLIGHT 0x10000u

/* The DescriptorChain slots, in the order they are stored. */
enum { SLOT_HEAD, SLOT_READABLE, SLOT_WRITABLE, SLOT_READABLE_LEN, SLOT_WRITABLE_LEN,
       SLOT_READ_POS, SLOT_COUNT };
static const char *const slot_names[SLOT_COUNT] = {
    "head", "readable", "writable", "readable_len", "writable_len", "_read_pos",
};

typedef struct {
    PyObject_HEAD
    Py_buffer desc;          /* the descriptor table: size * 16 bytes, 8-byte aligned */
    Py_buffer avail;         /* the available ring: 6 + 2 * size bytes, 2-byte aligned */
    Py_buffer used;          /* the used ring: 6 + 8 * size bytes, writable, 4-byte aligned */
    Py_buffer region;        /* the memory region, from region_copy */
    Py_buffer track;         /* the in-flight table: size uint32, writable (optional) */
    PyObject *region_view;   /* the region's own memoryview (checked for release) */
    PyObject *region_copy;   /* a private memoryview sharing its managed buffer */
    PyTypeObject *chain_cls; /* DescriptorChain */
    Py_ssize_t slot_offset[SLOT_COUNT];
    uint64_t region_gpa;
    uint64_t region_len;
    uint32_t size;
    unsigned long long fast_chains; /* chains built here (tests check the fast path ran) */
    unsigned long long fast_batches; /* used_many calls handled here */
    int has_desc, has_avail, has_used, has_region, has_track;
} QueueObject;

static inline void
track_set(QueueObject *self, uint32_t head, uint32_t value)
{
    if (self->has_track)
        ((uint32_t *)self->track.buf)[head] = value;
}

typedef struct {
    uint64_t offset; /* in the region */
    uint32_t len;
} Part;

static int
get_buffer(PyObject *obj, Py_buffer *view, int *has, int flags, Py_ssize_t min_len,
           uintptr_t align, const char *what)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *has = 1;
    if (view->len < min_len || ((uintptr_t)view->buf & (align - 1))) {
        PyErr_Format(PyExc_ValueError, "the %s buffer is too small or misaligned", what);
        return -1;
    }
    return 0;
}

/* Check that cls is a class whose instances _of could build and find its slot offsets. */
static int
bind_chain_class(QueueObject *self, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "chain_cls must be a class");
        return -1;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    if (type->tp_new != PyBaseObject_Type.tp_new || type->tp_alloc == NULL
        || type->tp_itemsize != 0 || type->tp_dictoffset != 0
        || !(type->tp_flags & Py_TPFLAGS_HEAPTYPE)
        || (type->tp_flags & Py_TPFLAGS_IS_ABSTRACT)) {
        PyErr_SetString(PyExc_TypeError, "chain_cls is not a plain slotted class");
        return -1;
    }
    PyObject *dict = type->tp_dict;
    for (int i = 0; i < SLOT_COUNT; i++) {
        PyObject *descr = dict ? PyDict_GetItemString(dict, slot_names[i]) : NULL;
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || ((PyDescrObject *)descr)->d_type != type) {
            PyErr_Format(PyExc_TypeError, "chain_cls has no slot %s", slot_names[i]);
            return -1;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)
            || member->offset < (Py_ssize_t)sizeof(PyObject)
            || member->offset + (Py_ssize_t)sizeof(PyObject *) > type->tp_basicsize) {
            PyErr_Format(PyExc_TypeError, "chain_cls slot %s is not a plain object slot",
                         slot_names[i]);
            return -1;
        }
        for (int j = 0; j < i; j++) {
            if (self->slot_offset[j] == member->offset) {
                PyErr_SetString(PyExc_TypeError, "chain_cls slots overlap");
                return -1;
            }
        }
        self->slot_offset[i] = member->offset;
    }
    Py_INCREF(cls);
    self->chain_cls = type;
    return 0;
}

static int
Queue_init(QueueObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"desc", "avail", "used", "region", "region_gpa", "size",
                             "chain_cls", "track", NULL};
    PyObject *desc, *avail, *used, *region, *chain_cls, *track = Py_None;
    unsigned long long region_gpa;
    unsigned int size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOKIO|O", kwlist, &desc, &avail, &used,
                                     &region, &region_gpa, &size, &chain_cls, &track))
        return -1;
    if (self->chain_cls != NULL || self->has_desc || self->has_avail || self->has_used
        || self->has_region) {
        PyErr_SetString(PyExc_RuntimeError, "a Queue is initialised once");
        return -1;
    }
    if (size < 1 || size > 32768 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size is not a power of two in 1..32768");
        return -1;
    }
    self->size = size;
    if (!PyMemoryView_Check(region)) {
        PyErr_SetString(PyExc_TypeError, "region must be a memoryview");
        return -1;
    }
    Py_buffer *rv = PyMemoryView_GET_BUFFER(region);
    if (rv->ndim != 1 || rv->itemsize != 1 || rv->suboffsets != NULL
        || (rv->strides != NULL && rv->strides[0] != 1) || rv->format == NULL
        || strcmp(rv->format, "B") != 0) {
        PyErr_SetString(PyExc_TypeError, "region must be a one-dimensional 'B' memoryview");
        return -1;
    }
    if (get_buffer(desc, &self->desc, &self->has_desc, PyBUF_SIMPLE, 16 * (Py_ssize_t)size, 8,
                   "descriptor table") < 0
        || get_buffer(avail, &self->avail, &self->has_avail, PyBUF_SIMPLE,
                      6 + 2 * (Py_ssize_t)size, 2, "available ring") < 0
        || get_buffer(used, &self->used, &self->has_used, PyBUF_WRITABLE,
                      6 + 8 * (Py_ssize_t)size, 4, "used ring") < 0)
        return -1;
    if (track != Py_None
        && get_buffer(track, &self->track, &self->has_track, PyBUF_WRITABLE,
                      4 * (Py_ssize_t)size, 4, "in-flight table") < 0)
        return -1;
    /* A private view on the region's managed buffer: ours to export, so the region's own view
     * can still be released (memory.close); that release is checked at every call. */
    self->region_copy = PyMemoryView_FromObject(region);
    if (self->region_copy == NULL)
        return -1;
    if (get_buffer(self->region_copy, &self->region, &self->has_region, PyBUF_SIMPLE, 0, 1,
                   "region") < 0)
        return -1;
    Py_INCREF(region);
    self->region_view = region;
    self->region_gpa = region_gpa;
    self->region_len = (uint64_t)self->region.len;
    if (region_gpa + self->region_len < region_gpa) {
        PyErr_SetString(PyExc_ValueError, "the region wraps around 2**64");
        return -1;
    }
    return bind_chain_class(self, chain_cls);
}

static int
Queue_traverse(QueueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->region_view);
    Py_VISIT(self->chain_cls);
    return 0;
}

static void
Queue_dealloc(QueueObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->has_desc)
        PyBuffer_Release(&self->desc);
    if (self->has_avail)
        PyBuffer_Release(&self->avail);
    if (self->has_used)
        PyBuffer_Release(&self->used);
    if (self->has_region)
        PyBuffer_Release(&self->region);
    if (self->has_track)
        PyBuffer_Release(&self->track);
    Py_CLEAR(self->region_copy);
    Py_CLEAR(self->region_view);
    Py_CLEAR(self->chain_cls);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int
region_released(QueueObject *self)
{
    return (((PyMemoryViewObject *)self->region_view)->flags & _Py_MEMORYVIEW_RELEASED) != 0;
}

/* A view of `len` bytes at `offset` of the region, sharing its managed buffer. */
static PyObject *
region_slice(QueueObject *self, uint64_t offset, uint32_t len)
{
    PyObject *view = PyMemoryView_FromObject(self->region_copy);
    if (view == NULL)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    b->buf = (char *)b->buf + offset;
    b->len = (Py_ssize_t)len;
    b->shape[0] = (Py_ssize_t)len;
    return view;
}

static PyObject *
parts_tuple(QueueObject *self, const Part *parts, int count)
{
    PyObject *tuple = PyTuple_New(count);
    if (tuple == NULL)
        return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *view = region_slice(self, parts[i].offset, parts[i].len);
        if (view == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, view);
    }
    return tuple;
}

/* Walk the chain at `head` as SplitQueue._walk does. Returns a new DescriptorChain; NULL without
 * an exception set when the chain is declined; NULL with one on an allocation failure. */
static PyObject *
walk(QueueObject *self, uint32_t head)
{
    Part parts[MAX_FAST_DESCRIPTORS];
    const unsigned char *table = self->desc.buf;
    uint32_t size = self->size, index = head, count = 0;
    int n_read = 0, n_write = 0;
    uint64_t read_len = 0, write_len = 0;
    if (head >= size)
        return NULL;
    for (;;) {
        if (++count > size || count > MAX_FAST_DESCRIPTORS)
            return NULL;
        /* One load of each half of the descriptor (guest-owned) into locals. */
        const uint64_t *d = (const uint64_t *)(table + 16 * (size_t)index);
        uint64_t addr = __atomic_load_n(&d[0], __ATOMIC_RELAXED);
        uint64_t rest = __atomic_load_n(&d[1], __ATOMIC_RELAXED);
        uint32_t len = (uint32_t)rest;
        uint32_t flags = (uint32_t)(rest >> 32) & 0xFFFF;
        uint32_t next = (uint32_t)(rest >> 48);
        if (flags & DESC_F_INDIRECT)
            return NULL;
        if (addr < self->region_gpa)
            return NULL;
        uint64_t offset = addr - self->region_gpa;
        if (offset > self->region_len || len > self->region_len - offset)
            return NULL;
        Part *part = &parts[n_read + n_write];
        part->offset = offset;
        part->len = len;
        if (flags & DESC_F_WRITE) {
            n_write++;
            write_len += len;
        }
        else if (n_write) {
            return NULL;
        }
        else {
            n_read++;
            read_len += len;
        }
        if (!(flags & DESC_F_NEXT))
            break;
        if (next >= size)
            return NULL;
        index = next;
    }
    if (read_len + write_len > MAX_CHAIN_BYTES)
        return NULL;

    PyObject *values[SLOT_COUNT] = {NULL};
    values[SLOT_HEAD] = PyLong_FromUnsignedLong(head);
    values[SLOT_READABLE] = parts_tuple(self, parts, n_read);
    values[SLOT_WRITABLE] = parts_tuple(self, parts + n_read, n_write);
    values[SLOT_READABLE_LEN] = PyLong_FromUnsignedLongLong(read_len);
    values[SLOT_WRITABLE_LEN] = PyLong_FromUnsignedLongLong(write_len);
    values[SLOT_READ_POS] = PyLong_FromLong(0);
    PyObject *chain = NULL;
    for (int i = 0; i < SLOT_COUNT; i++) {
        if (values[i] == NULL)
            goto fail;
    }
    /* All values exist before the instance does: a collection triggered by the allocation
     * never sees a half-filled chain (and would cope with one: unset slots are NULL). */
    chain = self->chain_cls->tp_alloc(self->chain_cls, 0);
    if (chain == NULL)
        goto fail;
    for (int i = 0; i < SLOT_COUNT; i++)
        *(PyObject **)((char *)chain + self->slot_offset[i]) = values[i]; /* steals */
    self->fast_chains++;
    return chain;
fail:
    for (int i = 0; i < SLOT_COUNT; i++)
        Py_XDECREF(values[i]);
    return NULL;
}

#define NOTHING_AVAILABLE (-1)
#define DECLINE_INDEX (-2)

/* The head at avail ring position `last`; when *shadow (the avail idx as last validated) was
 * reached, avail.idx is loaded once (acquire) and validated first. NOTHING_AVAILABLE, or
 * DECLINE_INDEX when the index is more than the queue size ahead (queue.py raises). */
static inline long
next_head(QueueObject *self, uint32_t last, uint32_t *shadow)
{
    const uint16_t *avail = self->avail.buf;
    if (last == *shadow) {
        uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
        uint32_t pending = (uint32_t)(idx - last) & 0xFFFF;
        if (pending == 0)
            return NOTHING_AVAILABLE;
        if (pending > self->size)
            return DECLINE_INDEX;
        *shadow = idx;
    }
    return __atomic_load_n(&avail[2 + (last & (self->size - 1))], __ATOMIC_RELAXED);
}

/* pop_many(out, last, shadow, limit) -> int
 *
 * Appends chains to the list `out` until it holds `limit`, as SplitQueue.pop_many does, starting
 * at last_avail_idx `last` with the validated avail idx shadow `shadow`. Returns
 * last | shadow << 16, plus 1 << 32 if it stopped at something it declines (queue.py then handles
 * that entry). Writes nothing to guest memory (queue.py writes avail_event). */
static PyObject *
Queue_pop_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "pop_many(out: list, last, shadow, limit)");
        return NULL;
    }
    PyObject *out = args[0];
    unsigned long last = PyLong_AsUnsignedLong(args[1]);
    unsigned long shadow = PyLong_AsUnsignedLong(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (last > 0xFFFF || shadow > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "indices are 16-bit");
        return NULL;
    }
    long long declined = region_released(self) ? DECLINED : 0;
    uint32_t shadow32 = (uint32_t)shadow;
    while (!declined && PyList_GET_SIZE(out) < limit) {
        long head = next_head(self, (uint32_t)last, &shadow32);
        if (head == NOTHING_AVAILABLE)
            break;
        PyObject *chain = head == DECLINE_INDEX ? NULL : walk(self, (uint32_t)head);
        if (chain == NULL) {
            if (PyErr_Occurred())
                return NULL;
            declined = DECLINED;
            break;
        }
        int rc = PyList_Append(out, chain);
        Py_DECREF(chain);
        if (rc < 0)
            return NULL;
        track_set(self, (uint32_t)head, IN_FLIGHT | (uint32_t)last);
        last = (last + 1) & 0xFFFF;
    }
    shadow = shadow32;
    return PyLong_FromLongLong((long long)last | ((long long)shadow << 16) | declined);
}

static PyObject *str_last_avail_idx, *str_avail_shadow, *str_event_idx, *str_notify;

/* A 16-bit index attribute of the SplitQueue, or -1 with an exception set. */
static long
index_attr(PyObject *queue, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(queue, name);
    if (value == NULL)
        return -1;
    long v = PyLong_AsLong(value);
    Py_DECREF(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "indices are 16-bit");
        return -1;
    }
    return v;
}

static int
set_index_attr(PyObject *queue, PyObject *name, unsigned long value)
{
    PyObject *v = PyLong_FromUnsignedLong(value);
    if (v == NULL)
        return -1;
    int rc = PyObject_SetAttr(queue, name, v);
    Py_DECREF(v);
    return rc;
}

/* pop(queue) -> DescriptorChain | None | False
 *
 * SplitQueue.pop's common case on the SplitQueue `queue` itself: reads its last_avail_idx and
 * _avail_shadow, pops one chain, stores the new indices and (event_idx with notifications on)
 * avail_event. Returns False, changing nothing, when it declines. */
static PyObject *
Queue_pop(QueueObject *self, PyObject *queue)
{
    long last = index_attr(queue, str_last_avail_idx);
    if (last < 0)
        return NULL;
    long shadow = index_attr(queue, str_avail_shadow);
    if (shadow < 0)
        return NULL;
    if (region_released(self))
        Py_RETURN_FALSE;
    uint32_t new_shadow = (uint32_t)shadow;
    long head = next_head(self, (uint32_t)last, &new_shadow);
    if (head == NOTHING_AVAILABLE)
        Py_RETURN_NONE;
    PyObject *chain = head == DECLINE_INDEX ? NULL : walk(self, (uint32_t)head);
    if (chain == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    last = (last + 1) & 0xFFFF;
    if ((new_shadow != (uint32_t)shadow && set_index_attr(queue, str_avail_shadow, new_shadow) < 0)
        || set_index_attr(queue, str_last_avail_idx, last) < 0)
        goto fail;
    PyObject *flag = PyObject_GetAttr(queue, str_event_idx);
    int event_idx = flag ? PyObject_IsTrue(flag) : -1;
    Py_XDECREF(flag);
    if (event_idx < 0)
        goto fail;
    if (event_idx) {
        flag = PyObject_GetAttr(queue, str_notify);
        int notify = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (notify < 0)
            goto fail;
        if (notify) {
            uint16_t *event = (uint16_t *)((char *)self->used.buf + 4 + 8 * (size_t)self->size);
            __atomic_store_n(event, (uint16_t)last, __ATOMIC_RELEASE);
        }
    }
    track_set(self, (uint32_t)head, IN_FLIGHT | (((uint32_t)last - 1) & 0xFFFF));
    return chain;
fail:
    Py_DECREF(chain);
    return NULL;
}

/* The le32 value of an int in 0..max, or -1 if it is anything else. */
static long long
small_int(PyObject *value, unsigned long long max)
{
    if (!PyLong_Check(value))
        return -1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || v < 0 || (unsigned long long)v > max)
        return -1;
    return v;
}

/* used_many(heads, written, used_idx) -> int
 *
 * SplitQueue.add_used_many's common case: every head an int below the queue size, `written` one
 * int or one per head, each in 0..2**32-1, heads and per-head lengths lists or tuples. Writes the
 * elements, publishes the used index (release store) and returns it; returns -1 and writes
 * nothing when it declines. */
static PyObject *
Queue_used_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "used_many(heads, written, used_idx)");
        return NULL;
    }
    PyObject *heads = args[0], *written = args[1];
    unsigned long idx = PyLong_AsUnsignedLong(args[2]);
    if (idx == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "indices are 16-bit");
        return NULL;
    }
    if (!PyList_CheckExact(heads) && !PyTuple_CheckExact(heads))
        return PyLong_FromLong(-1);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(heads);
    PyObject **head_items = PySequence_Fast_ITEMS(heads);
    PyObject **len_items = NULL;
    long long same_len = -1;
    if (PyLong_Check(written)) {
        same_len = small_int(written, MAX_CHAIN_BYTES);
        if (same_len < 0)
            return PyLong_FromLong(-1);
    }
    else if (PyList_CheckExact(written) || PyTuple_CheckExact(written)) {
        if (PySequence_Fast_GET_SIZE(written) != n)
            return PyLong_FromLong(-1);
        len_items = PySequence_Fast_ITEMS(written);
    }
    else {
        return PyLong_FromLong(-1);
    }
    /* Validate everything before writing anything: a declined batch leaves memory untouched
     * for the pure-Python path (which writes the entries before a bad one, then raises). */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (small_int(head_items[i], self->size - 1) < 0
            || (len_items != NULL && small_int(len_items[i], MAX_CHAIN_BYTES) < 0))
            return PyLong_FromLong(-1);
    }
    unsigned char *used = self->used.buf;
    uint32_t mask = self->size - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t elem[2];
        elem[0] = (uint32_t)small_int(head_items[i], mask);
        elem[1] = (uint32_t)(len_items ? small_int(len_items[i], MAX_CHAIN_BYTES) : same_len);
        memcpy(used + 4 + 8 * (size_t)(idx & mask), elem, sizeof elem);
        track_set(self, elem[0], 0);
        idx = (idx + 1) & 0xFFFF;
    }
    __atomic_store_n((uint16_t *)(used + 2), (uint16_t)idx, __ATOMIC_RELEASE);
    self->fast_batches++;
    return PyLong_FromUnsignedLong(idx);
}

/* should_interrupt(new, old, event_idx) -> bool
 *
 * SplitQueue._should_interrupt after its bookkeeping: a full fence between the used idx already
 * published and the load of the driver's word (x86 may reorder a store with a later load; without
 * the fence both sides can miss each other's notification), then one load of used_event (with
 * EVENT_IDX: did the used idx move from `old` to `new` past it?) or of avail.flags (is
 * NO_INTERRUPT clear?). */
static PyObject *
Queue_should_interrupt(QueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "should_interrupt(new, old, event_idx)");
        return NULL;
    }
    unsigned long new_idx = PyLong_AsUnsignedLong(args[0]);
    unsigned long old_idx = PyLong_AsUnsignedLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    int event_idx = PyObject_IsTrue(args[2]);
    if (event_idx < 0)
        return NULL;
    const uint16_t *avail = self->avail.buf;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx) {
        uint16_t used_event = __atomic_load_n(&avail[2 + self->size], __ATOMIC_RELAXED);
        return PyBool_FromLong(((new_idx - used_event - 1) & 0xFFFF)
                               < ((new_idx - old_idx) & 0xFFFF));
    }
    uint16_t flags = __atomic_load_n(&avail[0], __ATOMIC_RELAXED);
    return PyBool_FromLong(!(flags & 1));
}

static PyMethodDef Queue_methods[] = {
    {"should_interrupt", (PyCFunction)(void (*)(void))Queue_should_interrupt, METH_FASTCALL,
     "should_interrupt(new, old, event_idx) -> bool (fence, then used_event / avail.flags)"},
    {"pop_many", (PyCFunction)(void (*)(void))Queue_pop_many, METH_FASTCALL,
     "pop_many(out, last, shadow, limit) -> last | shadow << 16 | declined << 32"},
    {"pop", (PyCFunction)Queue_pop, METH_O,
     "pop(split_queue) -> DescriptorChain | None | False (declined)"},
    {"used_many", (PyCFunction)(void (*)(void))Queue_used_many, METH_FASTCALL,
     "used_many(heads, written, used_idx) -> new used idx, or -1 if declined"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Queue_members[] = {
    {"fast_chains", T_ULONGLONG, offsetof(QueueObject, fast_chains), READONLY,
     "chains built by the fast path"},
    {"fast_batches", T_ULONGLONG, offsetof(QueueObject, fast_batches), READONLY,
     "used_many batches written by the fast path"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "devicehost.virtio._queuec.Queue",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Queue_traverse,
    .tp_doc = "Queue(desc, avail, used, region, region_gpa, size, chain_cls): the fast paths of"
              " one split queue over a single-region memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Queue_init,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
    .tp_members = Queue_members,
};

static struct PyModuleDef queuec_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "devicehost.virtio._queuec",
    .m_doc = "Optional C fast paths of devicehost.virtio.queue (direct chains, used batches).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__queuec(void)
{
    if (PyType_Ready(&QueueType) < 0)
        return NULL;
    str_last_avail_idx = PyUnicode_InternFromString("last_avail_idx");
    str_avail_shadow = PyUnicode_InternFromString("_avail_shadow");
    str_event_idx = PyUnicode_InternFromString("event_idx");
    str_notify = PyUnicode_InternFromString("_notify");
    if (!str_last_avail_idx || !str_avail_shadow || !str_event_idx || !str_notify)
        return NULL;
    PyObject *module = PyModule_Create(&queuec_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Queue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
