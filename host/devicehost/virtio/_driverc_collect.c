/* SPDX-License-Identifier: MIT
 *
 * devicehost.virtio._driverc, collecting: reap and take_used_views, the fast path that takes
 * used entries off the used ring. The used idx is ACQUIRE-loaded once; each entry (id, len) is
 * loaded once into locals, checked against the chain in flight, and its block and descriptors
 * go back to the spare and free lists; used_event is stored with RELEASE. From the first entry
 * it declines (an unknown head, a length beyond the writable space, a multi-part chain, a full
 * spare list) the rest goes to the pure-Python method, whose result is merged.
 */
#include "_driverc.h"

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
    Py_ssize_t last = state_index(self, driverc_key.last_used, 0xFFFF);
    Py_ssize_t spare_pages = state_index(self, driverc_key.spare_pages, PY_SSIZE_T_MAX);
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
        if (state_set(self, driverc_key.last_used, last) < 0
            || state_set(self, driverc_key.spare_pages, spare_pages) < 0)
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

PyObject *
driverc_reap(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return collect(self, FB_REAP);
}

PyObject *
driverc_take_used_views(QueueObject *self, PyObject *Py_UNUSED(ignored))
{
    return collect(self, FB_TAKE_USED_VIEWS);
}
