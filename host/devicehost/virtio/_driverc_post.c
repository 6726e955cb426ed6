/* SPDX-License-Identifier: MIT
 *
 * devicehost.virtio._driverc, posting: add_readable, add_segments and add_writable_many, the
 * fast paths that put chains on the avail ring, with the checks that decide whether a call is
 * the common case (the argument's bytes, a free descriptor, a spare block of the right page
 * count). A readable chain's bytes are copied into a spare block; the descriptors and avail
 * entries are written with plain stores and the avail idx is published with one RELEASE store
 * per call. Anything else is declined to the pure-Python method (see _driverc.c).
 */
#include "_driverc.h"

static inline Py_ssize_t align_piece(Py_ssize_t n)
{
    return ((n + PIECE_ALIGN - 1) & -(Py_ssize_t)PIECE_ALIGN) + PIECE_ALIGN;
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
        ? PyTuple_Pack(5, buf, descriptors, self->no_views, driverc_int_zero, token) : NULL;
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
    if (state_set(self, driverc_key.spare_pages, spare_pages) < 0
        || state_set(self, driverc_key.avail_idx, avail_idx) < 0)
        return -1;
    return 0;
}

/* add_readable(first, second=None, token=None) -> head */
PyObject *
driverc_add_readable(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
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
        if (name == driverc_key.second && nargs < 2)
            second = args[nargs + i];
        else if (name == driverc_key.token && nargs < 3)
            token = args[nargs + i];
        else
            goto decline;
    }
    if (source_bytes(first, &b1, &held1, &p1, &n1) < 0)
        goto decline;
    if (second != Py_None && source_bytes(second, &b2, &held2, &p2, &n2) < 0)
        goto decline;
    Py_ssize_t spare_pages = state_index(self, driverc_key.spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, driverc_key.avail_idx, 0xFFFF);
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
PyObject *
driverc_add_segments(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
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
    Py_ssize_t spare_pages = state_index(self, driverc_key.spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, driverc_key.avail_idx, 0xFFFF);
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
PyObject *
driverc_add_writable_many(QueueObject *self, PyObject *const *args, Py_ssize_t nargs,
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
    Py_ssize_t spare_pages = state_index(self, driverc_key.spare_pages, PY_SSIZE_T_MAX);
    Py_ssize_t avail_idx = state_index(self, driverc_key.avail_idx, 0xFFFF);
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
        if (state_set(self, driverc_key.avail_idx, avail_idx) < 0
            || state_set(self, driverc_key.spare_pages, spare_pages) < 0)
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
