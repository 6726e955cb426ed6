/* SPDX-License-Identifier: MIT
 *
 * devicehost.virtio._driverc, shared by its translation units (_driverc.c: the module, the
 * Queue type and kick; _driverc_post.c: posting chains; _driverc_collect.c: collecting used
 * entries): the QueueObject, the layout constants, the interned keys of the DriverQueue's
 * state, the small inline helpers that read and write the rings and the state dict, and the
 * methods each file defines for the type's method table. The layout and the memory ordering
 * are described at the top of _driverc.c. Shared symbols carry the driverc_ prefix and hidden
 * visibility (nothing outside this extension module links against them).
 */
#ifndef DEVICEHOST_VIRTIO_DRIVERC_H
#define DEVICEHOST_VIRTIO_DRIVERC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the virtqueue layout is little-endian and this module writes it natively"
#endif

#define DRIVERC_HIDDEN __attribute__((visibility("hidden")))

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

/* Interned names (set once by PyInit__driverc in _driverc.c): the DriverQueue's state keys,
 * the keyword arguments add_readable takes and the doorbell's method. */
typedef struct {
    PyObject *avail_idx, *last_used, *spare_pages, *kicked_at, *kicks, *kick_doorbell;
    PyObject *ring, *second, *token, *free, *in_flight, *spare;
} DrivercKeys;

extern DRIVERC_HIDDEN DrivercKeys driverc_key;
extern DRIVERC_HIDDEN PyObject *driverc_int_zero; /* the writable_len of a readable chain */

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
static inline Py_ssize_t
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

static inline int
state_set(QueueObject *self, PyObject *key, Py_ssize_t value)
{
    PyObject *obj = PyLong_FromSsize_t(value);
    if (obj == NULL)
        return -1;
    int rc = PyDict_SetItem(self->state, key, obj);
    Py_DECREF(obj);
    return rc;
}

/* Publish the avail idx: everything written before it becomes the device's to read. */
static inline void
publish_avail(QueueObject *self, Py_ssize_t avail_idx)
{
    __atomic_store_n(avail_word(self, 1), (uint16_t)avail_idx, __ATOMIC_RELEASE);
}

/* Decline: pass the call (or the rest of a batch) to the pure-Python method `which`. */
static inline PyObject *
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

/* _driverc_post.c */
DRIVERC_HIDDEN PyObject *driverc_add_readable(QueueObject *self, PyObject *const *args,
                                              Py_ssize_t nargs, PyObject *kwnames);
DRIVERC_HIDDEN PyObject *driverc_add_segments(QueueObject *self, PyObject *const *args,
                                              Py_ssize_t nargs, PyObject *kwnames);
DRIVERC_HIDDEN PyObject *driverc_add_writable_many(QueueObject *self, PyObject *const *args,
                                                   Py_ssize_t nargs, PyObject *kwnames);

/* _driverc_collect.c */
DRIVERC_HIDDEN PyObject *driverc_reap(QueueObject *self, PyObject *ignored);
DRIVERC_HIDDEN PyObject *driverc_take_used_views(QueueObject *self, PyObject *ignored);

#endif /* DEVICEHOST_VIRTIO_DRIVERC_H */
