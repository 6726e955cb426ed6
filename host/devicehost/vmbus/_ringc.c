/* SPDX-License-Identifier: MIT
 *
 * devicehost.vmbus._ringc: the hot paths of the Hyper-V ring (devicehost/vmbus/ring.py and
 * ringwriter.py) in C.
 *
 * This module is an optional accelerator. It implements only the common case of each operation:
 * in-band packets written and read in contiguous ring memory without wrapping. Whenever anything
 * is unusual (the packet wraps, does not fit, has another type, an index is out of range, the
 * payload is not one contiguous buffer...) a function returns "not handled" and ring.py takes
 * its pure-Python path, which checks everything again and raises the precise error. So this
 * module never raises a ring error itself and never decides anything ring.py would decide
 * differently; tests/vmbus/test_ringc.py runs the same operations through both and compares.
 *
 * Layout (facts §3): control page u32 words: 0 in, 1 out, 2 interrupt_mask, 3 pending_send_size.
 * Descriptor: u16 type, u16 data_offset8, u16 length8, u16 flags, u64 transaction_id; payload
 * padded to 8; footer u64 = start offset << 32. Everything little-endian (ring.py refuses to
 * import on a big-endian machine, and so does this module).
 *
 * The peer owns half of the control page and may change it at any time (it may be another
 * process): every word the peer owns is loaded once into a local and validated before use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the Hyper-V ring layout is little-endian"
#endif

#define W_IN 0
#define W_OUT 1
#define W_MASK 2
#define CONTROL_MIN_BYTES (17 * 4)
#define TYPE_IN_BAND 6
#define TYPE_COMPLETION 11

typedef struct {
    PyObject_HEAD
    Py_buffer control;   /* the control page (writable) */
    Py_buffer data;      /* the data area (writable, contiguous) */
    PyObject *data_view; /* the memoryview that payload views are sliced from */
    PyObject *packet_cls;/* IncomingPacket: a tuple subclass with 8 fields */
    Py_ssize_t w_in;     /* bound writer: its `in` (ring.py's OutgoingRing._in) */
    Py_ssize_t r_cursor; /* bound reader: how far it has read (IncomingRing._cursor) */
    Py_ssize_t r_out;    /* bound reader: what it has released (IncomingRing._out) */
    PyObject *fallback;  /* bound: the pure-Python method for what the fast path declines */
    PyObject *fallback2; /* bound: a second one (commit's signal decision / write_inband_batch) */
    PyObject *fallback3; /* bound: a third one (read_batch) */
    Py_ssize_t size;     /* data_len */
    int has_control;
    int has_data;
} RingObject;

static PyObject *empty_bytes;
static PyObject *key_transaction_id, *key_completion_requested;

static inline uint32_t load_word(RingObject *self, int index)
{
    return __atomic_load_n(((uint32_t *)self->control.buf) + index, __ATOMIC_ACQUIRE);
}

/* Store a word the peer reads, ordered before every later load (the signalling handshake:
 * publish the index, then look at the peer's mask and index). */
static inline void publish_word(RingObject *self, int index, uint32_t value)
{
    __atomic_store_n(((uint32_t *)self->control.buf) + index, value, __ATOMIC_SEQ_CST);
}

static int
Ring_init(RingObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"control", "data", "packet_cls", NULL};
    PyObject *control, *data, *packet_cls;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &control, &data, &packet_cls))
        return -1;
    if (self->has_control || self->has_data) {
        PyErr_SetString(PyExc_RuntimeError, "a Ring is initialised once");
        return -1;
    }
    if (!PyType_Check(packet_cls) || !PyType_IsSubtype((PyTypeObject *)packet_cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "packet_cls must be a tuple subclass");
        return -1;
    }
    if (!PyMemoryView_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be a memoryview");
        return -1;
    }
    if (PyObject_GetBuffer(control, &self->control, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    self->has_control = 1;
    if (self->control.len < CONTROL_MIN_BYTES || ((uintptr_t)self->control.buf & 3)) {
        PyErr_SetString(PyExc_ValueError, "the control page is too small or misaligned");
        return -1;
    }
    if (PyObject_GetBuffer(data, &self->data, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    self->has_data = 1;
    if (self->data.len <= 0 || self->data.len > ((Py_ssize_t)1 << 31) || (self->data.len & 7)) {
        PyErr_SetString(PyExc_ValueError, "the data area has an unusable size");
        return -1;
    }
    self->size = self->data.len;
    Py_INCREF(data);
    self->data_view = data;
    Py_INCREF(packet_cls);
    self->packet_cls = packet_cls;
    return 0;
}

static int
Ring_traverse(RingObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->data_view);
    Py_VISIT(self->packet_cls);
    Py_VISIT(self->fallback);
    Py_VISIT(self->fallback2);
    Py_VISIT(self->fallback3);
    return 0;
}

static int
Ring_clear(RingObject *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->fallback2);
    Py_CLEAR(self->fallback3);
    return 0;
}

static void
Ring_dealloc(RingObject *self)
{
    PyObject_GC_UnTrack(self);
    Ring_clear(self);
    if (self->has_control)
        PyBuffer_Release(&self->control);
    if (self->has_data)
        PyBuffer_Release(&self->data);
    Py_XDECREF(self->data_view);
    Py_XDECREF(self->packet_cls);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline void put_u16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put_u64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint64_t get_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Write one in-band packet at `start` if it fits without wrapping; returns the offset after it
 * (0 when it ends exactly at the ring's end), or -1 when not handled. `free_bytes` is the space
 * the writer may use (already minus the 8 bytes that keep a full ring from looking empty). */
static inline Py_ssize_t
put_inband(RingObject *self, Py_ssize_t start, const void *payload, Py_ssize_t n,
           unsigned flags, uint64_t tid, Py_ssize_t free_bytes)
{
    Py_ssize_t size = self->size;
    Py_ssize_t msg_len = (n + 23) & ~(Py_ssize_t)7;
    /* length8 is a u16: a longer packet cannot be described (ring.py raises for it). */
    if (n < 0 || msg_len > 0xFFFF * 8 || msg_len + 8 > free_bytes || start + msg_len + 8 > size)
        return -1;
    unsigned char *p = (unsigned char *)self->data.buf + start;
    put_u16(p, TYPE_IN_BAND);
    put_u16(p + 2, 2);
    put_u16(p + 4, (uint16_t)(msg_len >> 3));
    put_u16(p + 6, (uint16_t)flags);
    put_u64(p + 8, tid);
    memmove(p + 16, payload, (size_t)n); /* the payload may be a view of this very ring */
    memset(p + 16 + n, 0, (size_t)(msg_len - 16 - n));
    put_u64(p + msg_len, (uint64_t)start << 32);
    Py_ssize_t end = start + msg_len + 8;
    return end == size ? 0 : end;
}

/* The buffer types taken here besides bytes (handled before): exactly a bytearray or a
 * memoryview. Any other object (an array, a bytes subclass, a tuple or list of parts, or no
 * buffer at all) is declined, and the Python writer decides what it is. */
static inline int
ring_py_buffer(PyObject *payload)
{
    return PyByteArray_CheckExact(payload) || PyMemoryView_Check(payload);
}

/* Free bytes for the writer whose index is `start`, or -1 if the peer's `out` is invalid. */
static inline Py_ssize_t
writer_free(RingObject *self, Py_ssize_t start)
{
    Py_ssize_t size = self->size;
    uint32_t out = load_word(self, W_OUT);
    if ((Py_ssize_t)out >= size || (out & 7))
        return -1;
    return (Py_ssize_t)out > start ? (Py_ssize_t)out - start - 8 : size - (start - (Py_ssize_t)out) - 8;
}

static int
valid_own_index(RingObject *self, Py_ssize_t index)
{
    return index >= 0 && index < self->size && !(index & 7);
}

/* Write in-band packets (flags 0, transaction id 0) from `items` at *pos while each is a bytes
 * object that fits without wrapping; returns how many, *pos is the offset after them. */
static Py_ssize_t
write_loop(RingObject *self, Py_ssize_t *pos, PyObject **items, Py_ssize_t count)
{
    Py_ssize_t at = *pos, written = 0;
    Py_ssize_t free_bytes = valid_own_index(self, at) ? writer_free(self, at) : -1;
    /* `out` only ever moves forward, freeing space: one snapshot is a safe bound. */
    while (free_bytes >= 0 && written < count && PyBytes_CheckExact(items[written])) {
        PyObject *payload = items[written];
        Py_ssize_t end = put_inband(self, at, PyBytes_AS_STRING(payload),
                                    PyBytes_GET_SIZE(payload), 0, 0, free_bytes);
        if (end < 0)
            break;
        free_bytes -= (end == 0 ? self->size : end) - at;
        at = end;
        written++;
    }
    *pos = at;
    return written;
}

/* write_inband_from(start, payloads) -> (position, written)
 * Writes in-band packets (flags 0, transaction id 0) from the sequence while each is a bytes
 * object that fits without wrapping; stops at the first that is not. Does not publish: the
 * caller stores `in` (ring.py's _commit) once it has written the rest. */
static PyObject *
Ring_write_inband_batch(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write_inband_from(start, payloads)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[0]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[1], "payloads must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t written = write_loop(self, &pos, PySequence_Fast_ITEMS(seq),
                                    PySequence_Fast_GET_SIZE(seq));
    Py_DECREF(seq);
    return Py_BuildValue("(nn)", pos, written);
}

/* The packet at `start`, if it is an in-band or completion packet with no extension lying in the
 * contiguous readable stretch [start, stop) with valid lengths and flags; else NULL with no error
 * set. On failure to allocate, NULL with an error set. */
static PyObject *
parse_fast(RingObject *self, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t *next)
{
    if (start + 16 > stop)
        return NULL;
    const unsigned char *p = (const unsigned char *)self->data.buf + start;
    uint16_t kind = get_u16(p), doff8 = get_u16(p + 2), len8 = get_u16(p + 4);
    uint16_t flags = get_u16(p + 6);
    Py_ssize_t length = (Py_ssize_t)len8 << 3;
    Py_ssize_t nxt = start + length + 8;
    if (doff8 != 2 || len8 < 2 || nxt > stop || flags > 1
        || (kind != TYPE_IN_BAND && kind != TYPE_COMPLETION))
        return NULL;
    uint64_t tid = get_u64(p + 8);
    if (nxt == self->size)
        nxt = 0;
    /* Each int object is made once and used twice where it can be (the slice bounds are the
     * payload offset; the next offset becomes the reader's cursor). */
    PyObject *payload_offset = PyLong_FromSsize_t(start + 16);
    PyObject *payload_end = PyLong_FromSsize_t(start + length);
    PyObject *bounds = (payload_offset && payload_end)
        ? PySlice_New(payload_offset, payload_end, NULL) : NULL;
    Py_XDECREF(payload_end);
    PyObject *payload = bounds ? PyObject_GetItem(self->data_view, bounds) : NULL;
    Py_XDECREF(bounds);
    PyTypeObject *cls = (PyTypeObject *)self->packet_cls;
    PyObject *packet = payload ? cls->tp_alloc(cls, 8) : NULL;
    if (packet == NULL) {
        Py_XDECREF(payload_offset);
        Py_XDECREF(payload);
        return NULL;
    }
    PyObject *next_obj = PyLong_FromSsize_t(nxt);
    PyObject *items[8] = {
        PyLong_FromLong(kind), PyLong_FromUnsignedLongLong(tid),
        Py_NewRef(flags ? Py_True : Py_False), payload, Py_NewRef(empty_bytes),
        PyLong_FromSsize_t(start), payload_offset, next_obj,
    };
    int failed = 0;
    for (int i = 0; i < 8; i++) {
        if (items[i] == NULL)
            failed = 1;
        PyTuple_SET_ITEM(packet, i, items[i]);
    }
    if (failed) {
        Py_DECREF(packet);
        return NULL;
    }
    *next = nxt;
    return packet;
}

/* Validated `in`, or -1. */
static inline Py_ssize_t
reader_in(RingObject *self)
{
    uint32_t inp = load_word(self, W_IN);
    if ((Py_ssize_t)inp >= self->size || (inp & 7))
        return -1;
    return (Py_ssize_t)inp;
}

/* Append to `packets` the fast-path packets from *start up to `in` (validated by the caller),
 * until the list holds max_packets; stops at the first packet that does not take the fast path.
 * *start is the offset after the last one. -1 with an error set on failure to allocate. */
static int
read_loop(RingObject *self, Py_ssize_t *start, Py_ssize_t inp, Py_ssize_t max_packets,
          PyObject *packets)
{
    Py_ssize_t at = *start;
    if (!valid_own_index(self, at) || !valid_own_index(self, inp))
        return 0;
    while (PyList_GET_SIZE(packets) < max_packets && at != inp) {
        Py_ssize_t nxt;
        PyObject *packet = parse_fast(self, at, inp > at ? inp : self->size, &nxt);
        if (packet == NULL) {
            if (PyErr_Occurred())
                return -1;
            break;
        }
        int rc = PyList_Append(packets, packet);
        Py_DECREF(packet);
        if (rc < 0)
            return -1;
        at = nxt;
        *start = at;
    }
    return 0;
}

/* read_from(cursor, in, max_packets) -> (packets, cursor)
 * Fast-path packets from `cursor` up to `in` (which the caller read and validated), at most
 * max_packets; stops at the first packet that does not take the fast path. */
static PyObject *
Ring_read_batch(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "read_from(cursor, in, max_packets)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]);
    Py_ssize_t inp = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_packets = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *packets = PyList_New(0);
    if (packets == NULL || read_loop(self, &start, inp, max_packets, packets) < 0) {
        Py_XDECREF(packets);
        return NULL;
    }
    return Py_BuildValue("(Nn)", packets, start);
}

/* ---- Bound mode: the fast paths as methods of one ring object ------------------------------
 *
 * bind(fallback, fallback2, fallback3) attaches this Ring to a ring object of ring.py, whose index then
 * lives here (members in_index for a writer; cursor and out_index for a reader; ring.py's
 * accelerated ring classes make their `_in` / `_cursor` / `_out` properties over them), and whose
 * pure-Python methods are the fallbacks. ring.py installs the bound methods below as instance
 * attributes, so a packet costs no Python frame; whatever they decline is passed, arguments
 * unchanged, to the pure-Python method. */

static PyObject *
Ring_bind(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])
        || (args[2] != Py_None && !PyCallable_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "bind(fallback, fallback2, fallback3)");
        return NULL;
    }
    Py_XSETREF(self->fallback, Py_NewRef(args[0]));
    Py_XSETREF(self->fallback2, Py_NewRef(args[1]));
    Py_XSETREF(self->fallback3, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static int
check_bound(RingObject *self)
{
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Ring is not bound to a ring object");
        return -1;
    }
    return 0;
}

static int
same_name(PyObject *name, PyObject *key)
{
    return name == key || PyUnicode_Compare(name, key) == 0;
}

/* write_inband(payload, *, transaction_id=0, completion_requested=False) -> bool */
static PyObject *
Ring_bound_write_inband(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    unsigned long long tid = 0;
    unsigned flags = 0;
    Py_ssize_t start;
    if (check_bound(self) < 0)
        return NULL;
    start = self->w_in;
    if (nargs != 1)
        goto decline;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        if (same_name(name, key_transaction_id)) {
            if (!PyLong_Check(value))
                goto decline;
            tid = PyLong_AsUnsignedLongLong(value);
            if (PyErr_Occurred())
                goto decline;
        } else if (same_name(name, key_completion_requested)) {
            int truth = PyObject_IsTrue(value);
            if (truth < 0)
                goto decline;
            flags = (unsigned)truth;
        } else {
            goto decline;
        }
    }
    if (!valid_own_index(self, start))
        goto decline;
    Py_ssize_t free_bytes = writer_free(self, start);
    if (free_bytes < 0)
        goto decline;
    PyObject *payload = args[0];
    Py_ssize_t end;
    if (PyBytes_CheckExact(payload)) {
        end = put_inband(self, start, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload),
                         flags, tid, free_bytes);
    } else {
        Py_buffer view;
        if (!ring_py_buffer(payload)
            || PyObject_GetBuffer(payload, &view, PyBUF_C_CONTIGUOUS) < 0)
            goto decline;
        end = put_inband(self, start, view.buf, view.len, flags, tid, free_bytes);
        PyBuffer_Release(&view);
    }
    if (end < 0)
        goto decline;
    self->w_in = end;
    publish_word(self, W_IN, (uint32_t)end);
    if (load_word(self, W_MASK) == 0 && (Py_ssize_t)load_word(self, W_OUT) == start)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
decline:
    PyErr_Clear(); /* the pure-Python method decides, and raises what it raises */
    return PyObject_Vectorcall(self->fallback, args, nargs, kwnames);
}

/* read() -> IncomingPacket */
static PyObject *
Ring_bound_read(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_bound(self) < 0)
        return NULL;
    Py_ssize_t start = self->r_cursor;
    Py_ssize_t inp = reader_in(self);
    if (inp >= 0 && inp != start && valid_own_index(self, start)) {
        Py_ssize_t nxt;
        PyObject *packet = parse_fast(self, start, inp > start ? inp : self->size, &nxt);
        if (packet != NULL) {
            self->r_cursor = nxt;
            return packet;
        }
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_CallNoArgs(self->fallback);
}

/* commit() -> bool: release what was read; whether to signal the writer. */
static PyObject *
Ring_bound_commit(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_bound(self) < 0)
        return NULL;
    Py_ssize_t old = self->r_out, cursor = self->r_cursor;
    if (cursor == old)
        Py_RETURN_FALSE;
    self->r_out = cursor;
    publish_word(self, W_OUT, (uint32_t)cursor);
    if ((load_word(self, 3) & ~(uint32_t)7) == 0)
        Py_RETURN_FALSE;
    /* The writer waits for room: whether this commit made enough is decided in ring.py. */
    PyObject *old_obj = PyLong_FromSsize_t(old);
    if (old_obj == NULL)
        return NULL;
    PyObject *result = PyObject_CallOneArg(self->fallback2, old_obj);
    Py_DECREF(old_obj);
    return result;
}

/* write_inband_batch(payloads) -> (written, signal): all of a list or tuple of bytes payloads
 * that fit without wrapping, published at once; anything else goes to the Python method. */
static PyObject *
Ring_bound_write_inband_batch(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    if (check_bound(self) < 0)
        return NULL;
    if (nargs == 1 && kwnames == NULL
        && (PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0]))) {
        PyObject *seq = args[0];
        Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
        Py_ssize_t start = self->w_in, pos = start;
        if (count > 0 && write_loop(self, &pos, PySequence_Fast_ITEMS(seq), count) == count) {
            self->w_in = pos;
            publish_word(self, W_IN, (uint32_t)pos);
            int signal = load_word(self, W_MASK) == 0 && (Py_ssize_t)load_word(self, W_OUT) == start;
            return Py_BuildValue("(nO)", count, signal ? Py_True : Py_False);
        }
        /* Not all of them: nothing was published; the Python method writes them its way. */
    }
    return PyObject_Vectorcall(self->fallback2, args, nargs, kwnames);
}

/* read_batch(max_packets=64) -> list: fast-path packets, then the Python method for the rest. */
static PyObject *
Ring_bound_read_batch(RingObject *self, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    if (check_bound(self) < 0)
        return NULL;
    Py_ssize_t max_packets = 64;
    if (kwnames != NULL || nargs > 1 || (nargs == 1 && !PyLong_CheckExact(args[0])))
        return PyObject_Vectorcall(self->fallback3, args, nargs, kwnames);
    if (nargs == 1) {
        max_packets = PyLong_AsSsize_t(args[0]);
        if (max_packets == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyObject_Vectorcall(self->fallback3, args, nargs, kwnames);
        }
    }
    Py_ssize_t inp = reader_in(self);
    if (inp < 0 || inp == self->r_cursor || max_packets < 1)
        return PyObject_Vectorcall(self->fallback3, args, nargs, kwnames);
    PyObject *packets = PyList_New(0);
    if (packets == NULL || read_loop(self, &self->r_cursor, inp, max_packets, packets) < 0) {
        Py_XDECREF(packets);
        return NULL;
    }
    Py_ssize_t got = PyList_GET_SIZE(packets);
    if (got == max_packets || self->r_cursor == inp)
        return packets;
    /* A packet the fast path does not take: the Python method reads on from here (and raises
     * for a corrupt one, the packets before it staying read, as it does on its own). */
    PyObject *rest_max = PyLong_FromSsize_t(max_packets - got);
    PyObject *rest = rest_max ? PyObject_CallOneArg(self->fallback3, rest_max) : NULL;
    Py_XDECREF(rest_max);
    if (rest == NULL || PyList_SetSlice(packets, got, got, rest) < 0) {
        Py_XDECREF(rest);
        Py_DECREF(packets);
        return NULL;
    }
    Py_DECREF(rest);
    return packets;
}

static PyMethodDef Ring_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))Ring_bind, METH_FASTCALL,
     "bind(fallback, fallback2, fallback3): attach to a ring object (see the comment above bind)"},
    {"write_inband", (PyCFunction)(void (*)(void))Ring_bound_write_inband,
     METH_FASTCALL | METH_KEYWORDS,
     "write_inband(payload, *, transaction_id=0, completion_requested=False) -> bool"},
    {"read", (PyCFunction)Ring_bound_read, METH_NOARGS, "read() -> IncomingPacket"},
    {"commit", (PyCFunction)Ring_bound_commit, METH_NOARGS, "commit() -> bool"},
    {"write_inband_batch", (PyCFunction)(void (*)(void))Ring_bound_write_inband_batch,
     METH_FASTCALL | METH_KEYWORDS, "write_inband_batch(payloads) -> (written, signal)"},
    {"read_batch", (PyCFunction)(void (*)(void))Ring_bound_read_batch,
     METH_FASTCALL | METH_KEYWORDS, "read_batch(max_packets=64) -> list"},
    {"write_inband_from", (PyCFunction)(void (*)(void))Ring_write_inband_batch, METH_FASTCALL,
     "write_inband_batch(start, payloads) -> (position, written)"},
    {"read_from", (PyCFunction)(void (*)(void))Ring_read_batch, METH_FASTCALL,
     "read_batch(cursor, in, max_packets) -> (packets, cursor)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Ring_members[] = {
    {"in_index", T_PYSSIZET, offsetof(RingObject, w_in), 0, "a bound writer's `in`"},
    {"cursor", T_PYSSIZET, offsetof(RingObject, r_cursor), 0, "a bound reader's read position"},
    {"out_index", T_PYSSIZET, offsetof(RingObject, r_out), 0, "a bound reader's released `out`"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "devicehost.vmbus._ringc.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear,
    .tp_doc = "Ring(control, data, packet_cls): the fast paths of one ring's memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_members = Ring_members,
};

static struct PyModuleDef ringc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "devicehost.vmbus._ringc",
    .m_doc = "Optional C fast paths of devicehost.vmbus.ring (in-band packets, no wrapping).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ringc(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    key_transaction_id = PyUnicode_InternFromString("transaction_id");
    key_completion_requested = PyUnicode_InternFromString("completion_requested");
    if (!empty_bytes || !key_transaction_id
        || !key_completion_requested)
        return NULL;
    PyObject *module = PyModule_Create(&ringc_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
