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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the virtqueue layout is little-endian and this module writes it natively"
#endif

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define RING_F_NO_NOTIFY 1
#define PIECE_ALIGN 64
#define PAGE_SIZE 4096
#define N_FALLBACKS 6
enum { FB_ADD_READABLE, FB_ADD_WRITABLE_MANY, FB_REAP, FB_TAKE_USED_VIEWS, FB_KICK,
       FB_ADD_SEGMENTS };

typedef struct {
    PyObject_HEAD
    PyObject *state;     /* the DriverQueue's __dict__ */
    PyObject *free;      /* list of free descriptor indices (popped from the end) */
    PyObject *in_flight; /* dict head -> (buffer, descriptors, parts, writable_len, token) */
    PyObject *spare;     /* dict pages -> list of buffers (block, gpa, view, pages) */
    PyObject *no_views;  /* the parts of a chain with nothing writable (shared empty list) */
    PyObject *fallback[N_FALLBACKS];
    Py_buffer desc, avail, used;
    int has_desc, has_avail, has_used;
    Py_ssize_t size;
    Py_ssize_t spare_max;
    int event_idx;
    int closed;
} QueueObject;

static PyObject *k_avail_idx, *k_last_used, *k_spare_pages, *k_kicked_at, *k_kicks;
static PyObject *k_kick_doorbell, *k_ring, *k_second, *k_token, *k_free, *k_in_flight, *k_spare;
static PyObject *int_zero;

static inline Py_ssize_t align_piece(Py_ssize_t n)
{
    return ((n + PIECE_ALIGN - 1) & -(Py_ssize_t)PIECE_ALIGN) + PIECE_ALIGN;
}

static inline void
put_desc(QueueObject *self, Py_ssize_t index, uint64_t addr, uint32_t len, uint16_t flags,
         uint16_t next)
{
    unsigned char *p = (unsigned char *)self->desc.buf + 16 * index;
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

static inline uint16_t *avail_word(QueueObject *self, Py_ssize_t i)
{
    return (uint16_t *)self->avail.buf + i;
}

static inline uint16_t *used_word(QueueObject *self, Py_ssize_t i)
{
    return (uint16_t *)self->used.buf + i;
}

/* An int in [0, max] from the state dict, or -1 (no error set) if it is not one. */
static Py_ssize_t
state_index(QueueObject *self, PyObject *key, Py_ssize_t max)
{
    PyObject *value = PyDict_GetItemWithError(self->state, key);
    if (value == NULL || !PyLong_CheckExact(value)) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(value);
    if (v < 0 || v > max) {
        PyErr_Clear();
        return -1;
    }
    return v;
}

static int
state_set(QueueObject *self, PyObject *key, Py_ssize_t value)
{
    PyObject *obj = PyLong_FromSsize_t(value);
    if (obj == NULL)
        return -1;
    int rc = PyDict_SetItem(self->state, key, obj);
    Py_DECREF(obj);
    return rc;
}

/* A descriptor index from the free list (borrowed) at position i, or NULL if it is not one. */
static PyObject *
free_head(QueueObject *self, Py_ssize_t i, Py_ssize_t *out)
{
    PyObject *obj = PyList_GET_ITEM(self->free, i);
    if (!PyLong_CheckExact(obj))
        return NULL;
    Py_ssize_t v = PyLong_AsSsize_t(obj);
    if (v < 0 || v >= self->size) {
        PyErr_Clear();
        return NULL;
    }
    *out = v;
    return obj;
}

/* The bytes of a transmit buffer: exact bytes, or an exact bytearray / a memoryview of format
 * "B", 1-D and C-contiguous (what Python's len() and slice assignment treat as its bytes).
 * -1 (no error set) for anything else. */
static int
source_bytes(PyObject *obj, Py_buffer *view, int *held, const char **p, Py_ssize_t *n)
{
    if (PyBytes_CheckExact(obj)) {
        *p = PyBytes_AS_STRING(obj);
        *n = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (!PyByteArray_CheckExact(obj) && !PyMemoryView_Check(obj))
        return -1;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return -1;
    }
    *held = 1;
    if (view->ndim != 1 || view->itemsize != 1
        || (view->format != NULL && strcmp(view->format, "B") != 0))
        return -1;
    *p = (const char *)view->buf;
    *n = view->len;
    return 0;
}

/* A buffer record (block, gpa, view, pages) with `pages` pages: its gpa, or -1 if it is not
 * one (no error set). */
static int
buffer_gpa(PyObject *buf, Py_ssize_t pages, uint64_t *gpa)
{
    if (!PyTuple_CheckExact(buf) || PyTuple_GET_SIZE(buf) != 4)
        return -1;
    PyObject *g = PyTuple_GET_ITEM(buf, 1), *v = PyTuple_GET_ITEM(buf, 2);
    PyObject *p = PyTuple_GET_ITEM(buf, 3);
    if (!PyLong_CheckExact(g) || !PyMemoryView_Check(v) || !PyLong_CheckExact(p))
        return -1;
    if (PyLong_AsSsize_t(p) != pages) {
        PyErr_Clear();
        return -1;
    }
    *gpa = PyLong_AsUnsignedLongLong(g);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* The spare list of blocks of `pages` pages (borrowed), or NULL (no error set) if there is
 * none with a block in it. */
static PyObject *
spare_list(QueueObject *self, Py_ssize_t pages)
{
    PyObject *key = PyLong_FromSsize_t(pages);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *list = PyDict_GetItemWithError(self->spare, key);
    Py_DECREF(key);
    if (list == NULL || !PyList_CheckExact(list) || PyList_GET_SIZE(list) == 0) {
        PyErr_Clear();
        return NULL;
    }
    return list;
}

static inline int
list_drop(PyObject *list, Py_ssize_t count)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    return PyList_SetSlice(list, n - count, n, NULL);
}

static inline void
publish_avail(QueueObject *self, Py_ssize_t avail_idx)
{
    __atomic_store_n(avail_word(self, 1), (uint16_t)avail_idx, __ATOMIC_RELEASE);
}

static PyObject *
call_fallback(QueueObject *self, int which, PyObject *const *args, size_t nargsf,
              PyObject *kwnames)
{
    PyObject *fallback = self->fallback[which];
    if (fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Queue has no fallback (it was cleared)");
        return NULL;
    }
    return PyObject_Vectorcall(fallback, args, nargsf, kwnames);
}

/* Post one device-readable chain of `first` (n1 bytes) and, if n2, `second` into a spare block,
 * laid out as driverqueue.py lays it out (second at offset 0, first after it, 64-byte aligned
 * with a gap; first alone at 0), with a le32 `patch` stored at byte `patch_at` of the copy of
 * `first` when patch_at >= 0. Writes the descriptors and the avail entry at *avail_idx but does
 * not publish; updates *avail_idx and *spare_pages (the caller stores them in the state).
 * Returns 0 when posted (*head set to a new reference), 1 when declined (nothing changed, no
 * error set), -1 on error. */
static int
post_readable(QueueObject *self, const char *p1, Py_ssize_t n1, const char *p2, Py_ssize_t n2,
              Py_ssize_t patch_at, uint32_t patch, PyObject *token, Py_ssize_t *avail_idx,
              Py_ssize_t *spare_pages, PyObject **head)
{
    Py_buffer dst;
    if (n1 > (Py_ssize_t)UINT32_MAX || n2 > (Py_ssize_t)UINT32_MAX)
        return 1;
    Py_ssize_t ndesc = n2 ? 2 : 1;
    Py_ssize_t free_n = PyList_GET_SIZE(self->free);
    if (free_n < ndesc)
        return 1; /* QueueFull is Python's */
    Py_ssize_t off1 = n2 ? align_piece(n2) : 0;
    Py_ssize_t end = off1 + align_piece(n1);
    Py_ssize_t pages = (end + PAGE_SIZE - 1) / PAGE_SIZE;
    if (*spare_pages < pages)
        return 1;
    PyObject *spare = spare_list(self, pages);
    if (spare == NULL)
        return 1; /* the allocator is Python's */
    PyObject *buf = PyList_GET_ITEM(spare, PyList_GET_SIZE(spare) - 1);
    uint64_t gpa;
    Py_ssize_t head_i, nxt_i = 0;
    PyObject *head_obj = free_head(self, free_n - 1, &head_i);
    PyObject *nxt_obj = ndesc == 2 ? free_head(self, free_n - 2, &nxt_i) : Py_None;
    if (head_obj == NULL || nxt_obj == NULL || buffer_gpa(buf, pages, &gpa) < 0)
        return 1;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(buf, 2), &dst,
                           PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return 1;
    }
    if (dst.len < end) {
        PyBuffer_Release(&dst);
        return 1;
    }
    /* Everything checked: from here on the chain is posted. The borrowed references (buf,
     * head_obj, nxt_obj) are owned by the new tuples before the lists drop them; the in-flight
     * dict is written last, as replacing an entry may run arbitrary code. */
    PyObject *descriptors = ndesc == 2 ? PyTuple_Pack(2, head_obj, nxt_obj)
                                       : PyTuple_Pack(1, head_obj);
    PyObject *flight = descriptors
        ? PyTuple_Pack(5, buf, descriptors, self->no_views, int_zero, token) : NULL;
    Py_XDECREF(descriptors);
    if (flight == NULL) {
        PyBuffer_Release(&dst);
        return -1;
    }
    PyObject *result = Py_NewRef(head_obj);
    if (list_drop(spare, 1) < 0 || list_drop(self->free, ndesc) < 0) {
        PyBuffer_Release(&dst);
        Py_DECREF(flight);
        Py_DECREF(result);
        return -1;
    }
    unsigned char *base = (unsigned char *)dst.buf;
    /* memmove: a source may view guest memory, even this block */
    if (ndesc == 2) {
        memmove(base, p2, (size_t)n2);
        memmove(base + off1, p1, (size_t)n1);
        put_desc(self, head_i, gpa + (uint64_t)off1, (uint32_t)n1, DESC_F_NEXT, (uint16_t)nxt_i);
        put_desc(self, nxt_i, gpa, (uint32_t)n2, 0, 0);
    } else {
        memmove(base, p1, (size_t)n1);
        put_desc(self, head_i, gpa, (uint32_t)n1, 0, 0);
    }
    if (patch_at >= 0)
        memcpy(base + off1 + patch_at, &patch, 4);
    PyBuffer_Release(&dst);
    *avail_word(self, 2 + *avail_idx % self->size) = (uint16_t)head_i;
    *avail_idx = (*avail_idx + 1) & 0xFFFF;
    *spare_pages -= pages;
    int rc = PyDict_SetItem(self->in_flight, result, flight);
    Py_DECREF(flight);
    if (rc < 0) {
        Py_DECREF(result);
        return -1;
    }
    *head = result;
    return 0;
}

/* Publish *avail_idx and store it and spare_pages in the state. */
static int
finish_posting(QueueObject *self, Py_ssize_t avail_idx, Py_ssize_t spare_pages)
{
    publish_avail(self, avail_idx);
    if (state_set(self, k_spare_pages, spare_pages) < 0
        || state_set(self, k_avail_idx, avail_idx) < 0)
        return -1;
    return 0;
}

/* add_readable(first, second=None, token=None) -> head */
static PyObject *
Queue_add_readable(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    PyObject *first, *second = Py_None, *token = Py_None, *result = NULL;
    Py_buffer b1, b2;
    int held1 = 0, held2 = 0;
    const char *p1 = NULL, *p2 = NULL;
    Py_ssize_t n1 = 0, n2 = 0, nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);

    if (self->closed || nargs < 1 || nargs > 3)
        goto decline;
    first = args[0];
    if (nargs > 1)
        second = args[1];
    if (nargs > 2)
        token = args[2];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (name == k_second && nargs < 2)
            second = args[nargs + i];
        else if (name == k_token && nargs < 3)
            token = args[nargs + i];
        else
            goto decline;
    }
    if (source_bytes(first, &b1, &held1, &p1, &n1) < 0)
        goto decline;
    if (second != Py_None && source_bytes(second, &b2, &held2, &p2, &n2) < 0)
        goto decline;
    Py_ssize_t spare_pages = state_index(self, k_spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, k_avail_idx, 0xFFFF);
    if (spare_pages < 0 || avail_idx < 0)
        goto decline;
    int rc = post_readable(self, p1, n1, p2, n2, -1, 0, token, &avail_idx, &spare_pages,
                           &result);
    if (rc > 0)
        goto decline;
    if (rc == 0 && finish_posting(self, avail_idx, spare_pages) < 0)
        Py_CLEAR(result);
    goto done;

decline:
    PyErr_Clear();
    result = call_fallback(self, FB_ADD_READABLE, args, (size_t)nargs, kwnames);
done:
    if (held1)
        PyBuffer_Release(&b1);
    if (held2)
        PyBuffer_Release(&b2);
    return result;
}

/* add_segments(header, data, segment, length_at) -> bytes posted */
static PyObject *
Queue_add_segments(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames)
{
    Py_buffer hb, db;
    int held_h = 0, held_d = 0;
    const char *ph = NULL, *pd = NULL;
    Py_ssize_t nh = 0, nd = 0, offset = 0;
    PyObject *result = NULL;

    if (self->closed || nargs != 4 || kwnames != NULL || !PyLong_CheckExact(args[2])
        || !PyLong_CheckExact(args[3]))
        goto decline;
    Py_ssize_t segment = PyLong_AsSsize_t(args[2]);
    Py_ssize_t length_at = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred() || segment <= 0)
        goto decline;
    if (source_bytes(args[0], &hb, &held_h, &ph, &nh) < 0
        || source_bytes(args[1], &db, &held_d, &pd, &nd) < 0)
        goto decline;
    if (length_at < 0 || length_at > nh - 4)
        goto decline; /* the ValueError is Python's */
    Py_ssize_t spare_pages = state_index(self, k_spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, k_avail_idx, 0xFFFF);
    if (spare_pages < 0 || avail_idx < 0)
        goto decline;
    int rc = 0;
    while (offset < nd && PyList_GET_SIZE(self->free) >= 2) {
        Py_ssize_t n = nd - offset < segment ? nd - offset : segment;
        PyObject *head = NULL;
        rc = post_readable(self, ph, nh, pd + offset, n, length_at, (uint32_t)n, Py_None,
                           &avail_idx, &spare_pages, &head);
        if (rc != 0)
            break;
        Py_DECREF(head);
        offset += n;
    }
    if (offset && finish_posting(self, avail_idx, spare_pages) < 0)
        goto done;
    if (rc < 0)
        goto done;
    if (rc == 0) { /* all posted, or out of descriptors */
        result = PyLong_FromSsize_t(offset);
        goto done;
    }
    if (offset) { /* no spare block for the next piece (or another decline): Python goes on */
        PyObject *rest_data = PySequence_GetSlice(args[1], offset, nd);
        if (rest_data == NULL)
            goto done;
        PyObject *rest_args[4] = {args[0], rest_data, args[2], args[3]};
        PyObject *rest = call_fallback(self, FB_ADD_SEGMENTS, rest_args, 4, NULL);
        Py_DECREF(rest_data);
        if (rest == NULL)
            goto done;
        Py_ssize_t more = PyLong_AsSsize_t(rest);
        Py_DECREF(rest);
        if (more == -1 && PyErr_Occurred())
            goto done;
        result = PyLong_FromSsize_t(offset + more);
        goto done;
    }
decline:
    PyErr_Clear();
    result = call_fallback(self, FB_ADD_SEGMENTS, args, (size_t)nargs, kwnames);
done:
    if (held_h)
        PyBuffer_Release(&hb);
    if (held_d)
        PyBuffer_Release(&db);
    return result;
}

/* add_writable_many(count, size) -> posted */
static PyObject *
Queue_add_writable_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    Py_ssize_t posted = 0, count = 0, size = 0;
    if (self->closed || nargs != 2 || kwnames != NULL || !PyLong_CheckExact(args[0])
        || !PyLong_CheckExact(args[1]))
        goto decline;
    count = PyLong_AsSsize_t(args[0]);
    size = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred() || size < 0 || size > (Py_ssize_t)UINT32_MAX)
        goto decline;
    Py_ssize_t free_n = PyList_GET_SIZE(self->free);
    Py_ssize_t n = count < free_n ? count : free_n;
    if (n <= 0)
        goto decline;
    Py_ssize_t pages = (align_piece(size) + PAGE_SIZE - 1) / PAGE_SIZE;
    PyObject *spare = spare_list(self, pages);
    Py_ssize_t spare_pages = state_index(self, k_spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, k_avail_idx, 0xFFFF);
    if (spare == NULL || spare_pages < 0 || avail_idx < 0)
        goto decline;
    PyObject *size_obj = args[1];
    int failed = 0;
    while (posted < n && PyList_GET_SIZE(spare) > 0 && spare_pages >= pages) {
        PyObject *buf = PyList_GET_ITEM(spare, PyList_GET_SIZE(spare) - 1);
        uint64_t gpa;
        Py_ssize_t head;
        PyObject *head_obj = free_head(self, PyList_GET_SIZE(self->free) - 1, &head);
        if (head_obj == NULL || buffer_gpa(buf, pages, &gpa) < 0)
            break;
        /* The new tuples own buf and head_obj before the lists drop them; the in-flight dict
         * is written last (replacing an entry may run arbitrary code). */
        PyObject *descriptors = PyTuple_Pack(1, head_obj);
        PyObject *flight = descriptors ? PyTuple_Pack(5, buf, descriptors,
                                                      PyTuple_GET_ITEM(buf, 2), size_obj,
                                                      Py_None) : NULL;
        Py_XDECREF(descriptors);
        if (flight == NULL) {
            failed = 1;
            break;
        }
        PyObject *key = PyTuple_GET_ITEM(descriptors, 0);
        if (list_drop(spare, 1) < 0 || list_drop(self->free, 1) < 0) {
            Py_DECREF(flight);
            failed = 1;
            break;
        }
        put_desc(self, head, gpa, (uint32_t)size, DESC_F_WRITE, 0);
        *avail_word(self, 2 + avail_idx % self->size) = (uint16_t)head;
        avail_idx = (avail_idx + 1) & 0xFFFF;
        spare_pages -= pages;
        posted++;
        int rc = PyDict_SetItem(self->in_flight, key, flight);
        Py_DECREF(flight);
        if (rc < 0) {
            failed = 1;
            break;
        }
    }
    if (posted) {
        publish_avail(self, avail_idx);
        if (state_set(self, k_avail_idx, avail_idx) < 0
            || state_set(self, k_spare_pages, spare_pages) < 0)
            return NULL;
    }
    if (failed)
        return NULL;
    if (posted == n)
        return PyLong_FromSsize_t(posted);
    if (posted) {
        /* No spare block for the rest: Python allocates them. */
        PyObject *rest_args[2] = {PyLong_FromSsize_t(count - posted), size_obj};
        if (rest_args[0] == NULL)
            return NULL;
        PyObject *rest = call_fallback(self, FB_ADD_WRITABLE_MANY, rest_args, 2, NULL);
        Py_DECREF(rest_args[0]);
        if (rest == NULL)
            return NULL;
        Py_ssize_t more = PyLong_AsSsize_t(rest);
        Py_DECREF(rest);
        if (more == -1 && PyErr_Occurred())
            return NULL;
        return PyLong_FromSsize_t(posted + more);
    }
decline:
    PyErr_Clear();
    return call_fallback(self, FB_ADD_WRITABLE_MANY, args, (size_t)nargs, kwnames);
}

/* The device's bytes of an in-flight chain's parts, as Python's _part_view gives them, for
 * the parts the fast path takes (the buffer's view, or a list of one view); NULL with no error
 * set for the others. */
static PyObject *
written_view(PyObject *parts, Py_ssize_t written)
{
    if (PyList_CheckExact(parts) && PyList_GET_SIZE(parts) == 1)
        parts = PyList_GET_ITEM(parts, 0);
    if (!PyMemoryView_Check(parts))
        return NULL;
    return PySequence_GetSlice(parts, 0, written);
}

/* reap() and take_used_views(): take the used entries the fast path covers, then hand the rest
 * (from the first it declines) to the Python method and merge its result. */
static PyObject *
collect(QueueObject *self, int which)
{
    int want_views = which == FB_TAKE_USED_VIEWS;
    if (self->closed)
        return call_fallback(self, which, NULL, 0, NULL);
    Py_ssize_t last = state_index(self, k_last_used, 0xFFFF);
    Py_ssize_t spare_pages = state_index(self, k_spare_pages, PY_SSIZE_T_MAX);
    if (last < 0 || spare_pages < 0)
        return call_fallback(self, which, NULL, 0, NULL);
    Py_ssize_t used_idx = __atomic_load_n(used_word(self, 1), __ATOMIC_ACQUIRE);
    PyObject *views = want_views ? PyList_New(0) : NULL;
    if (want_views && views == NULL)
        return NULL;
    if (used_idx == last)
        return want_views ? views : PyLong_FromLong(0);
    Py_ssize_t count = 0, size = self->size;
    int failed = 0;
    while (last != used_idx) {
        const unsigned char *e = (const unsigned char *)self->used.buf + 4 + 8 * (last % size);
        uint32_t head, written;
        memcpy(&head, e, 4); /* loaded once; only these locals are used */
        memcpy(&written, e + 4, 4);
        PyObject *head_obj = PyLong_FromUnsignedLong(head);
        if (head_obj == NULL) {
            failed = 1;
            break;
        }
        PyObject *flight = PyDict_GetItemWithError(self->in_flight, head_obj);
        PyObject *view = NULL;
        Py_ssize_t pages = 0;
        int take = 0;
        if (flight != NULL && PyTuple_CheckExact(flight) && PyTuple_GET_SIZE(flight) == 5) {
            PyObject *buf = PyTuple_GET_ITEM(flight, 0), *descs = PyTuple_GET_ITEM(flight, 1);
            PyObject *wlen = PyTuple_GET_ITEM(flight, 3);
            Py_ssize_t writable_len = PyLong_CheckExact(wlen) ? PyLong_AsSsize_t(wlen) : -1;
            if (PyTuple_CheckExact(buf) && PyTuple_GET_SIZE(buf) == 4
                && PyLong_CheckExact(PyTuple_GET_ITEM(buf, 3)))
                pages = PyLong_AsSsize_t(PyTuple_GET_ITEM(buf, 3));
            take = writable_len >= 0 && (Py_ssize_t)written <= writable_len && pages > 0
                && pages <= self->spare_max && spare_pages <= self->spare_max - pages
                && PyTuple_CheckExact(descs)
                && PyTuple_GET_SIZE(descs) >= 1;
            for (Py_ssize_t i = 0; take && i < PyTuple_GET_SIZE(descs); i++)
                take = PyLong_CheckExact(PyTuple_GET_ITEM(descs, i));
            if (take && want_views) {
                view = written_view(PyTuple_GET_ITEM(flight, 2), (Py_ssize_t)written);
                take = view != NULL;
            }
        }
        if (!take) { /* declined (or the device lied): Python decides from this entry on */
            Py_DECREF(head_obj);
            if (PyErr_Occurred())
                failed = 1;
            break;
        }
        Py_INCREF(flight);
        PyObject *key = PyLong_FromSsize_t(pages);
        PyObject *kept = key ? PyDict_GetItemWithError(self->spare, key) : NULL;
        int rc = key == NULL || PyErr_Occurred() ? -1 : 0;
        if (rc == 0 && kept == NULL) {
            kept = PyList_New(0);
            rc = kept == NULL ? -1 : PyDict_SetItem(self->spare, key, kept);
            Py_XDECREF(kept); /* the dict holds it */
        } else if (rc == 0 && !PyList_CheckExact(kept)) {
            rc = -1;
            PyErr_SetString(PyExc_TypeError, "a spare entry is not a list");
        }
        Py_XDECREF(key);
        if (rc == 0)
            rc = PyDict_DelItem(self->in_flight, head_obj);
        if (rc == 0 && want_views) {
            PyObject *pair = PyTuple_New(2);
            PyObject *w = PyLong_FromUnsignedLong(written);
            if (pair == NULL || w == NULL) {
                Py_XDECREF(pair);
                Py_XDECREF(w);
                rc = -1;
            } else {
                PyTuple_SET_ITEM(pair, 0, w);
                PyTuple_SET_ITEM(pair, 1, view);
                view = NULL;
                rc = PyList_Append(views, pair);
                Py_DECREF(pair);
            }
        }
        if (rc == 0)
            rc = PyList_Append(kept, PyTuple_GET_ITEM(flight, 0));
        PyObject *descs = PyTuple_GET_ITEM(flight, 1);
        for (Py_ssize_t i = PyTuple_GET_SIZE(descs) - 1; rc == 0 && i >= 0; i--)
            rc = PyList_Append(self->free, PyTuple_GET_ITEM(descs, i));
        Py_XDECREF(view);
        Py_DECREF(flight);
        Py_DECREF(head_obj);
        if (rc < 0) {
            failed = 1;
            break;
        }
        spare_pages += pages;
        last = (last + 1) & 0xFFFF;
        count++;
    }
    if (count) {
        if (self->event_idx)
            __atomic_store_n(avail_word(self, 2 + size), (uint16_t)last, __ATOMIC_RELEASE);
        if (state_set(self, k_last_used, last) < 0
            || state_set(self, k_spare_pages, spare_pages) < 0)
            failed = 1;
    }
    if (failed) {
        Py_XDECREF(views);
        return NULL;
    }
    if (last == used_idx)
        return want_views ? views : PyLong_FromSsize_t(count);
    PyObject *rest = call_fallback(self, which, NULL, 0, NULL);
    if (rest == NULL) {
        Py_XDECREF(views);
        return NULL;
    }
    if (!want_views) {
        Py_ssize_t more = PyLong_AsSsize_t(rest);
        Py_DECREF(rest);
        if (more == -1 && PyErr_Occurred())
            return NULL;
        return PyLong_FromSsize_t(count + more);
    }
    Py_ssize_t got = PyList_GET_SIZE(views);
    int rc = PyList_SetSlice(views, got, got, rest);
    Py_DECREF(rest);
    if (rc < 0) {
        Py_DECREF(views);
        return NULL;
    }
    return views;
}

static PyObject *
Queue_reap(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return collect(self, FB_REAP);
}

static PyObject *
Queue_take_used_views(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return collect(self, FB_TAKE_USED_VIEWS);
}

/* kick() -> bool */
static PyObject *
Queue_kick(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        return call_fallback(self, FB_KICK, NULL, 0, NULL);
    Py_ssize_t avail_idx = state_index(self, k_avail_idx, 0xFFFF);
    Py_ssize_t kicked_at = state_index(self, k_kicked_at, 0xFFFF);
    Py_ssize_t kicks = state_index(self, k_kicks, PY_SSIZE_T_MAX - 1);
    PyObject *doorbell = PyDict_GetItemWithError(self->state, k_kick_doorbell);
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
    if (state_set(self, k_kicked_at, avail_idx) < 0)
        return NULL;
    if (needed) {
        if (state_set(self, k_kicks, kicks + 1) < 0)
            return NULL;
        Py_INCREF(doorbell);
        PyObject *rung = PyObject_CallMethodNoArgs(doorbell, k_ring);
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
    self->free = state_object(state, k_free, &PyList_Type);
    self->in_flight = self->free ? state_object(state, k_in_flight, &PyDict_Type) : NULL;
    self->spare = self->in_flight ? state_object(state, k_spare, &PyDict_Type) : NULL;
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
    {"add_readable", (PyCFunction)(void (*)(void))Queue_add_readable,
     METH_FASTCALL | METH_KEYWORDS, "add_readable(first, second=None, token=None) -> head"},
    {"add_segments", (PyCFunction)(void (*)(void))Queue_add_segments,
     METH_FASTCALL | METH_KEYWORDS, "add_segments(header, data, segment, length_at) -> posted"},
    {"add_writable_many", (PyCFunction)(void (*)(void))Queue_add_writable_many,
     METH_FASTCALL | METH_KEYWORDS, "add_writable_many(count, size) -> posted"},
    {"reap", (PyCFunction)Queue_reap, METH_NOARGS, "reap() -> count"},
    {"take_used_views", (PyCFunction)Queue_take_used_views, METH_NOARGS,
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
        {&k_avail_idx, "avail_idx"}, {&k_last_used, "last_used"},
        {&k_spare_pages, "_spare_pages"}, {&k_kicked_at, "_kicked_at"}, {&k_kicks, "kicks"},
        {&k_kick_doorbell, "kick_doorbell"}, {&k_ring, "ring"}, {&k_second, "second"},
        {&k_token, "token"}, {&k_free, "_free"}, {&k_in_flight, "_in_flight"},
        {&k_spare, "_spare"},
    };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if (*keys[i].slot == NULL && (*keys[i].slot = PyUnicode_InternFromString(keys[i].name)) == NULL)
            return NULL;
    }
    if (int_zero == NULL && (int_zero = PyLong_FromLong(0)) == NULL)
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
