"""The C virtqueue accelerator (devicehost.virtio._queuec) against the pure-Python queue.

The same operations on an accelerated SplitQueue and a pure-Python one, over two guest memories
with identical bytes, must give the same return values (chains down to the guest offsets of their
parts), the same errors and the same memory after every operation, whatever the guest writes into
its descriptor table and rings. (Whether the build failed although a compiler was present is
checked in tests/test_accel.py.)
"""

from __future__ import annotations

import ctypes
import gc
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from devicehost.memory import GuestMemory
from devicehost.virtio import queue as queue_module
from devicehost.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DescriptorChain,
    QueueError,
    QueueLayout,
    QueueState,
    SplitQueue,
)

if queue_module._queuec is None:
    pytest.skip("the C virtqueue accelerator is not built (or is turned off)",
                allow_module_level=True)
_queuec: Any = queue_module._queuec

MEM = 0x10000
DESC, AVAIL, USED, INDIRECT, DATA = 0x1000, 0x2000, 0x3000, 0x8000, 0x4000
MAX_SIZE = 16


@contextmanager
def pure_python() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(queue_module, "_queuec", None)
        yield


def _address(view: memoryview) -> int:
    return ctypes.addressof((ctypes.c_char * 0).from_buffer(view))


def describe(value: Any) -> Any:
    """A comparable picture of a return value: chains down to their parts' guest offsets."""
    if isinstance(value, list):
        return [describe(v) for v in value]
    if not isinstance(value, DescriptorChain):
        return value
    parts = []
    for part in (*value.readable, *value.writable):
        assert type(part) is memoryview and part.format == "B" and part.ndim == 1
        base = memoryview(part.obj)
        parts.append((_address(part) - _address(base), len(part), bytes(part), part.readonly,
                      part.c_contiguous, type(part.obj)))
    return ("chain", value.head, value.readable_len, value.writable_len, value.remaining,
            len(value.readable), len(value.writable), parts)


class Twin:
    """Two guest memories with the same bytes; an accelerated queue and a pure-Python one."""

    def __init__(self, size: int, state: QueueState, **kwargs: Any) -> None:
        self.size = size
        self.memories = [GuestMemory.anonymous(MEM), GuestMemory.anonymous(MEM)]
        layout = QueueLayout(size, DESC, AVAIL, USED)
        self.fast = SplitQueue(self.memories[0], layout, state=state, **kwargs)
        with pure_python():
            self.slow = SplitQueue(self.memories[1], layout, state=state, **kwargs)
        assert self.fast._fast is not None and self.slow._fast is None

    def write(self, gpa: int, data: bytes) -> None:
        for memory in self.memories:
            memory.write(gpa, data)

    def apply(self, op: Callable[[SplitQueue], Any], *, memory: bool = True) -> Any:
        """Run ``op`` on both queues; compare results, errors, state and (unless the test
        released it) memory."""
        outcomes = []
        for queue, accelerated in ((self.fast, True), (self.slow, False)):
            try:
                if accelerated:
                    result: Any = ("ok", describe(op(queue)))
                else:
                    with pure_python():
                        result = ("ok", describe(op(queue)))
            except (QueueError, ValueError, TypeError) as exc:
                result = ("error", type(exc), str(exc))
            broken = None if queue.broken is None else str(queue.broken)
            outcomes.append((result, queue.state(), queue._avail_shadow, broken,
                             queue.used_idx, queue._signalled_used, queue._notify))
        assert outcomes[0] == outcomes[1]
        if memory:
            assert self.memories[0].read(0, MEM) == self.memories[1].read(0, MEM)
        return outcomes[0][0]


# -- the differential test -------------------------------------------------------------------

addresses = st.one_of(
    st.integers(DATA, DATA + 0x400),
    st.integers(MEM - 0x40, MEM + 0x10),
    st.sampled_from([0, INDIRECT, 1 << 63, (1 << 64) - 8]),
)
lengths = st.one_of(st.integers(0, 0x40), st.sampled_from([16, 32, 0x1000, MEM, 0xFFFFFFFF]))
flags = st.one_of(st.sampled_from([0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE]),
                  st.integers(0, 7))
descriptors = st.tuples(addresses, lengths, flags, st.integers(0, MAX_SIZE + 1))

def _operations(size: int, honest: bool) -> st.SearchStrategy[tuple[Any, ...]]:
    heads = st.integers(0, size - 1) if honest else st.integers(0, MAX_SIZE + 1)
    table_entry = _honest_descriptors(size) if honest else descriptors
    pops = st.one_of(
        st.tuples(st.just("pop")),
        st.tuples(st.just("pop_many"), st.one_of(st.none(), st.integers(0, MAX_SIZE + 2))),
    )
    publish = st.tuples(st.just("publish"), st.lists(heads, min_size=1, max_size=size + 1))
    return st.one_of(
        pops, publish, pops, publish, pops, publish,
        st.tuples(st.just("desc"), st.integers(0, MAX_SIZE - 1), table_entry),
        st.tuples(st.just("indirect"), st.integers(0, 7), descriptors),
        st.tuples(st.just("avail_idx"), st.integers(-3, MAX_SIZE + 3)),  # a jump
        st.tuples(st.just("avail_word"), st.sampled_from([0, 4 + 2 * MAX_SIZE]),
                  st.integers(0, 0xFFFF)),
        st.tuples(st.just("add_used"), st.integers(-1, MAX_SIZE), st.integers(0, 1 << 33)),
        st.tuples(st.just("add_used_many"), st.lists(heads, max_size=5),
                  st.one_of(st.integers(0, 1 << 16), st.integers(-1, 1 << 33),
                            st.lists(st.integers(-1, 1 << 33), max_size=5))),
        st.tuples(st.just("needs_interrupt")),
        st.tuples(st.just("push"), st.integers(-1, MAX_SIZE), st.integers(0, 1 << 33)),
        st.tuples(st.just("enable_notifications")),
        st.tuples(st.just("disable_notifications")),
    )


def _honest_descriptors(size: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    # Well-formed direct descriptors (chains may still loop through NEXT, rarely).
    return st.tuples(st.integers(DATA, DATA + 0x400), st.integers(0, 0x40),
                     st.sampled_from([0, 0, DESC_F_WRITE, DESC_F_NEXT]),
                     st.integers(0, size - 1))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    honest = draw(st.booleans())
    table = []
    for i in range(size):
        # Chains that end (NEXT only to a later entry), so that the fast path runs a lot; a
        # lying guest mixes in arbitrary descriptors.
        if honest or draw(st.booleans()):
            addr, length, flag, _ = draw(_honest_descriptors(size))
            table.append((addr, length, flag if i + 1 < size else flag & ~DESC_F_NEXT, i + 1))
        else:
            table.append(draw(descriptors))
    return {
        "size": size,
        "honest": honest,
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.booleans()),
        "state": QueueState(draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))),
        "table": table,
        "initial": draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size)),
        "ops": draw(st.lists(_operations(size, honest), min_size=8, max_size=30)),
    }


def _run_op(op: tuple[Any, ...], size: int) -> Callable[[SplitQueue], Any]:
    kind = op[0]
    if kind == "pop":
        def pop(q: SplitQueue) -> Any:
            chain = q.pop()
            if chain is not None and chain.writable_len:
                chain.write_at(0, b"W" * min(3, chain.writable_len))
            return chain
        return pop
    if kind == "pop_many":
        return lambda q: q.pop_many(op[1])
    if kind == "add_used":
        return lambda q: q.add_used(op[1], op[2])
    if kind == "add_used_many":
        return lambda q: q.add_used_many(op[1], op[2])
    if kind == "push":
        return lambda q: q.push(op[1], op[2])
    if kind == "needs_interrupt":
        return lambda q: q.needs_interrupt()
    if kind == "enable_notifications":
        return lambda q: q.enable_notifications()
    assert kind == "disable_notifications"
    return lambda q: q.disable_notifications()


@settings(max_examples=250, deadline=None)
@given(scenarios())
def test_accelerated_queue_behaves_like_the_pure_python_one(scenario: dict[str, Any]) -> None:
    size = scenario["size"]
    twin = Twin(size, scenario["state"], event_idx=scenario["event_idx"],
                indirect=scenario["indirect"])
    for i, desc in enumerate(scenario["table"]):
        twin.write(DESC + 16 * i, struct.pack("<QIHH", *desc))
    twin.write(DATA, bytes(range(256)) * 16)
    avail_idx = scenario["state"].last_avail_idx
    twin.write(AVAIL + 2, struct.pack("<H", avail_idx))
    for op in [("publish", scenario["initial"]), *scenario["ops"]]:
        kind = op[0]
        if kind == "desc":
            if op[1] < size:
                twin.write(DESC + 16 * op[1], struct.pack("<QIHH", *op[2]))
        elif kind == "indirect":
            twin.write(INDIRECT + 16 * op[1], struct.pack("<QIHH", *op[2]))
        elif kind == "publish":
            heads = op[1]
            if scenario["honest"]:  # an honest driver never has more than size pending
                pending = (avail_idx - twin.slow.last_avail_idx) & 0xFFFF
                heads = heads[: max(0, size - pending)]
            for head in heads:
                twin.write(AVAIL + 4 + 2 * (avail_idx % size), struct.pack("<H", head))
                avail_idx = (avail_idx + 1) & 0xFFFF
            twin.write(AVAIL + 2, struct.pack("<H", avail_idx))
        elif kind == "avail_idx" and not scenario["honest"]:
            avail_idx = (avail_idx + op[1]) & 0xFFFF
            twin.write(AVAIL + 2, struct.pack("<H", avail_idx))
        elif kind == "avail_word":
            offset = op[1] if op[1] == 0 else 4 + 2 * size
            twin.write(AVAIL + offset, struct.pack("<H", op[2]))
        elif kind != "avail_idx":
            result = twin.apply(_run_op(op, size))
            if result[0] == "error":
                event(f"{op[0]} raised {result[1].__name__}")
    fast = twin.fast._fast
    event("C chains: " + ("none" if not fast.fast_chains else
                          "1-4" if fast.fast_chains < 5 else "5 or more"))
    event("C used batches: " + ("none" if not fast.fast_batches else "some"))


# -- the fast path runs ------------------------------------------------------------------------


def _honest_twin(size: int = 8, count: int = 8, **kwargs: Any) -> Twin:
    twin = Twin(size, QueueState(), **kwargs)
    for i in range(size):
        twin.write(DESC + 16 * i, struct.pack("<QIHH", DATA + 0x40 * i, 0x40,
                                              DESC_F_WRITE if i % 2 else 0, 0))
    for i in range(count):
        twin.write(AVAIL + 4 + 2 * (i % size), struct.pack("<H", i % size))
    twin.write(AVAIL + 2, struct.pack("<H", count))
    return twin


def test_the_accelerator_is_used_for_common_chains_and_used_batches() -> None:
    twin = _honest_twin(event_idx=True)
    fast = twin.fast._fast
    assert twin.apply(lambda q: q.pop())[0] == "ok"
    assert fast.fast_chains == 1
    result = twin.apply(lambda q: q.pop_many(5))
    assert [c[1] for c in result[1]] == [1, 2, 3, 4, 5]
    assert fast.fast_chains == 6
    twin.apply(lambda q: q.pop_many())
    assert fast.fast_chains == 8
    twin.apply(lambda q: q.add_used_many([0, 1, 2], [1, 2, 3]))
    twin.apply(lambda q: q.add_used_many((3, 4), 7))
    assert fast.fast_batches == 2
    assert twin.apply(lambda q: q.needs_interrupt()) == ("ok", True)


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ([(INDIRECT, 32, DESC_F_INDIRECT, 0)], "an indirect descriptor"),
        ([(MEM - 8, 16, 0, 0)], "a range outside memory"),
        ([(DATA, 1, DESC_F_NEXT, 0)], "a loop"),
        ([(DATA, 1, DESC_F_WRITE | DESC_F_NEXT, 1), (DATA, 1, 0, 0)], "readable after writable"),
        ([(DATA, 1, DESC_F_NEXT, 9)], "a next index out of range"),
        ([(DATA, 0xFFFFFFFF - MEM, DESC_F_NEXT, 1), (DATA, MEM, 0, 0)], "a chain of 2**32 bytes"),
    ],
)
def test_unusual_chains_are_declined_to_python(table: list[tuple[int, ...]], why: str) -> None:
    twin = Twin(8, QueueState(), indirect=True)
    for i, desc in enumerate(table):
        twin.write(DESC + 16 * i, struct.pack("<QIHH", *desc))
    twin.write(INDIRECT, struct.pack("<QIHH", DATA, 4, 0, 0))
    twin.write(INDIRECT + 16, struct.pack("<QIHH", DATA + 8, 4, DESC_F_WRITE, 0))
    twin.write(AVAIL + 4, struct.pack("<HH", 0, 0))
    twin.write(AVAIL + 2, struct.pack("<H", 2))
    twin.apply(lambda q: q.pop_many())
    twin.apply(lambda q: q.pop())
    assert twin.fast._fast.fast_chains == 0, why


def test_long_chains_and_bad_heads_and_index_jumps_are_declined() -> None:
    twin = Twin(128, QueueState())
    for i in range(127):
        twin.write(DESC + 16 * i, struct.pack("<QIHH", DATA + i, 1, DESC_F_NEXT, i + 1))
    twin.write(DESC + 16 * 127, struct.pack("<QIHH", DATA, 1, 0, 0))
    twin.write(AVAIL + 4, struct.pack("<HHH", 64, 0, 200))  # 64 descriptors, then 128, bad head
    twin.write(AVAIL + 2, struct.pack("<H", 3))
    result = twin.apply(lambda q: q.pop_many())
    assert [(c[1], c[2]) for c in result[1]] == [(64, 64), (0, 128)]
    assert twin.fast._fast.fast_chains == 1  # the 64-descriptor chain; 128 is past the limit
    assert twin.apply(lambda q: q.pop())[0] == "error"  # head 200
    jump = Twin(8, QueueState())
    jump.write(AVAIL + 2, struct.pack("<H", 9))
    assert jump.apply(lambda q: q.pop_many())[0] == "error"
    assert jump.apply(lambda q: q.pop())[0] == "error"


def test_invalid_used_batches_are_declined_to_python() -> None:
    twin = _honest_twin()
    for heads, written in [([0, 8], 0), ([0], -1), ([0], 1 << 32), ([0, 1], [1]),
                           ([0, "1"], 0), ((h for h in [0]), 0), ([0], [True]), ([0], 1.0)]:
        twin.apply(lambda q, h=heads, w=written: q.add_used_many(h, w))  # type: ignore[misc]
    assert twin.fast._fast.fast_batches == 1  # only ([0], [True]): bool is an int, in range


def test_a_released_region_is_declined() -> None:
    twin = _honest_twin()
    for memory in twin.memories:
        memory.regions[0].view.release()
    assert twin.apply(lambda q: q.pop_many(), memory=False)[0] == "error"
    assert twin.apply(lambda q: q.pop(), memory=False)[0] == "error"


def test_multi_region_memory_and_unusual_regions_are_not_bound() -> None:
    from devicehost.memory import MemoryRegion

    memory = GuestMemory([MemoryRegion.anonymous(0, MEM), MemoryRegion.anonymous(MEM, MEM)])
    memory.write(DESC, struct.pack("<QIHH", MEM + 0x100, 8, 0, 0))
    memory.write(AVAIL + 2, struct.pack("<HH", 1, 0))
    queue = SplitQueue(memory, QueueLayout(8, DESC, AVAIL, USED))
    assert queue._fast is None
    chain = queue.pop()
    assert chain is not None and chain.readable_len == 8 and queue.pop() is None
    single = GuestMemory.anonymous(MEM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(single.regions[0], "view", single.regions[0].view.cast("c"))
        assert SplitQueue(single, QueueLayout(8, DESC, AVAIL, USED))._fast is None


def test_chain_classes_that_cannot_be_built_directly_are_refused() -> None:
    memory = GuestMemory.anonymous(MEM)
    region = memory.regions[0]
    views = (memory.view(DESC, 16 * 8), memory.view(AVAIL, 22), memory.view(USED, 70))

    class WithDict:
        pass

    class Slotted:
        __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    class Renamed(DescriptorChain):
        __slots__ = ()

    for cls in (WithDict, Slotted, Renamed, 42):
        with pytest.raises(TypeError):
            _queuec.Queue(*views, region.view, region.gpa, 8, cls)
    with pytest.raises(TypeError):
        _queuec.Queue(*views, region.view.cast("b"), region.gpa, 8, DescriptorChain)
    with pytest.raises(ValueError, match="too small"):
        _queuec.Queue(views[0][:16], *views[1:], region.view, region.gpa, 8, DescriptorChain)
    bound = _queuec.Queue(*views, region.view, region.gpa, 8, DescriptorChain)
    with pytest.raises(RuntimeError):
        bound.__init__(*views, region.view, region.gpa, 8, DescriptorChain)


# -- reference counts and garbage collection ---------------------------------------------------


def _refcounts(chain: DescriptorChain) -> list[int]:
    counts = [sys.getrefcount(chain), sys.getrefcount(chain.readable),
              sys.getrefcount(chain.writable)]  # (the ints are shared small ints)
    counts += [sys.getrefcount(part) for part in (*chain.readable, *chain.writable)]
    return counts


def test_chains_have_the_same_reference_counts_and_are_tracked_by_the_gc() -> None:
    twin = _honest_twin(count=4)
    fast_chains = twin.fast.pop_many()
    with pure_python():
        slow_chains = twin.slow.pop_many()
    assert len(fast_chains) == len(slow_chains) == 4
    for fast, slow in zip(fast_chains, slow_chains, strict=True):
        assert type(fast) is DescriptorChain and gc.is_tracked(fast) == gc.is_tracked(slow)
        assert _refcounts(fast) == _refcounts(slow)
        assert describe(fast) == describe(slow)


def test_dropped_chains_release_everything() -> None:
    twin = _honest_twin(size=8, count=8)
    gc.collect()
    type_refs = sys.getrefcount(DescriptorChain)
    for _ in range(50):
        chains = twin.fast.pop_many()
        twin.fast.add_used_many([c.head for c in chains], 0)
        twin.write(AVAIL + 2, struct.pack("<H", twin.fast.last_avail_idx + 8 & 0xFFFF))
        for i in range(8):
            twin.write(AVAIL + 4 + 2 * i, struct.pack("<H", i))
        del chains
    assert twin.fast._fast.fast_chains == 400
    assert sys.getrefcount(DescriptorChain) == type_refs
    # A chain in a reference cycle is collected.
    chain = twin.fast.pop()
    assert chain is not None
    holder: list[Any] = [chain]
    holder.append(holder)
    del chain, holder
    gc.collect()
    assert sys.getrefcount(DescriptorChain) == type_refs
    # Nothing keeps the mapping exported: once the queues are gone, the memory closes.
    del twin.fast, twin.slow
    gc.collect()
    for memory in twin.memories:
        memory.close()
