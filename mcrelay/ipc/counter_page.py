"""The counter page: where a data worker keeps its counters, so that a crash cannot lose them.

For each data-worker process the supervisor creates a memfd of :data:`PAGE_BYTES`, sealed so
that its size can never change, maps it, and passes it to the worker (`CounterPage`, one fd).
The worker keeps every counter it has in the page, and the supervisor reads the page once the
process has been reaped, whatever killed it: nothing the worker counted is lost.

Layout, in native 64-bit words (aligned, so a reader never sees one half-written; the
supervisor reads the page only once its writer is dead anyway)::

    word 0        cells in use (a high-water mark: cells past it were never written)
    word 1        kernel drops, as the worker last read them from its rings
    words 2-3     reserved (0)
    then cells    [tag, a, b, c], CELLS of them

A cell is self-describing: its tag is a 63-bit hash naming what it counts, so neither side
needs the other's layout, and the supervisor turns tags back into names from its own table
(:func:`rule_tag`, :func:`output_tag`, :func:`drop_tag`). A rule's input cell holds
(packets, bytes, 0), an output's (packets, bytes, errors), a drop reason's (count, 0, 0). A
tag of 0 marks a free cell. The worker zeroes a cell's counts before it writes its tag, and
frees a cell by clearing its tag.

The page is the worker's to write, so what the supervisor reads from it is untrusted:
:func:`read` bounds the cell count by the page, skips cells with a count over
`messages.MAX_COUNT`, and keeps the first of two cells with one tag.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections.abc import Iterator

from mcrelay.ipc.messages import MAX_COUNT, MAX_DROP_REASONS
from mcrelay.rules import MAX_RULES, MAX_TABLE_OUTPUTS

log = logging.getLogger("mcrelay.data")

__all__ = [
    "CELLS",
    "PAGE_BYTES",
    "Cells",
    "PageContents",
    "drop_tag",
    "output_tag",
    "private_cell",
    "read",
    "rule_tag",
]

WORD = 8
HEADER_WORDS = 4
CELL_WORDS = 4
#: One cell per rule input, per output and per drop reason of the largest table.
CELLS = MAX_RULES + MAX_TABLE_OUTPUTS + MAX_DROP_REASONS
#: 7 MB of address space, of which only the cells in use ever take memory.
PAGE_BYTES = (HEADER_WORDS + CELLS * CELL_WORDS) * WORD
_USED, _KERNEL_DROPS = 0, 1


def _tag(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1 | 1


def rule_tag(rule_id: str) -> int:
    """The tag of rule ``rule_id``'s input cell."""
    return _tag(f"in\0{rule_id}")


def output_tag(rule_id: str, output: str) -> int:
    """The tag of the cell of ``output`` (its text form, ``ADDR:PORT:IF[:TTL]``) of a rule."""
    return _tag(f"out\0{rule_id}\0{output}")


def drop_tag(reason: str) -> int:
    return _tag(f"drop\0{reason}")


def private_cell() -> memoryview:
    """A cell in this process's own memory: for counters kept where no page is."""
    return memoryview(bytearray(CELL_WORDS * WORD)).cast("Q")


class Cells:
    """A data worker's cells: in its counter page once it has one, private until then.

    :meth:`cell` hands out one cell (4 words, writable in place) per tag, the same one for as
    long as the tag is held; :meth:`release` frees it for reuse.
    """

    def __init__(self) -> None:
        self._words: memoryview | None = None
        self._held: dict[int, memoryview] = {}
        self._index: dict[int, int] = {}
        self._free: list[int] = []
        self._used = 0
        self._full = False

    @property
    def in_page(self) -> bool:
        return self._words is not None

    def attach(self, fd: int) -> None:
        """Map the page behind ``fd`` (closed here) and move every held cell into it, counts
        included. Cells handed out before stay private: the caller hands out new ones."""
        try:
            if os.fstat(fd).st_size < PAGE_BYTES:
                raise ValueError("the counter page is smaller than its layout")
            mapping = mmap.mmap(fd, PAGE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        held, self._held = self._held, {}
        self._words = memoryview(mapping).cast("Q")
        self._index, self._free, self._used = {}, [], 0
        for tag, old in held.items():
            self.cell(tag)[1:] = old[1:]

    def cell(self, tag: int) -> memoryview:
        cell = self._held.get(tag)
        if cell is not None:
            return cell
        words = self._words
        index = self._free.pop() if self._free else self._used
        if words is None or index >= CELLS:
            # No page (yet), or it is full (the table is bounded so that it is not): counted
            # all the same, only not kept through a crash.
            if words is not None and not self._full:
                self._full = True
                log.error("the counter page is full: further counters are lost if this worker dies")
            cell = private_cell()
        else:
            if index == self._used:
                self._used += 1
                words[_USED] = self._used
            start = HEADER_WORDS + index * CELL_WORDS
            cell = words[start : start + CELL_WORDS]
            cell[1] = cell[2] = cell[3] = 0  # counts first, then the tag that names them
            self._index[tag] = index
        cell[0] = tag
        self._held[tag] = cell
        return cell

    def release(self, tag: int) -> None:
        cell = self._held.pop(tag, None)
        if cell is None:
            return
        cell[0] = 0
        index = self._index.pop(tag, None)
        if index is not None:
            self._free.append(index)

    def held(self) -> Iterator[int]:
        return iter(self._held)

    def set_kernel_drops(self, count: int) -> None:
        if self._words is not None:
            self._words[_KERNEL_DROPS] = min(count, MAX_COUNT)


class PageContents:
    """What a counter page held: counts by tag, and the kernel drops."""

    def __init__(self, cells: dict[int, tuple[int, int, int]], kernel_drops: int | None) -> None:
        self.cells = cells
        #: None when the word was out of bounds.
        self.kernel_drops = kernel_drops
        #: Cells skipped for a count out of bounds or a repeated tag.
        self.refused = 0


def read(page: mmap.mmap) -> PageContents:
    """Every cell in use in ``page``, validated: a worker can write anything into it."""
    with memoryview(page) as raw, raw.cast("Q") as words:
        used = min(words[_USED], CELLS)
        kernel = words[_KERNEL_DROPS]
        values = words[HEADER_WORDS : HEADER_WORDS + used * CELL_WORDS].tolist()
    contents = PageContents({}, kernel if kernel <= MAX_COUNT else None)
    cells = contents.cells
    for i in range(0, len(values), CELL_WORDS):
        tag, a, b, c = values[i : i + CELL_WORDS]
        if not tag:
            continue
        if a > MAX_COUNT or b > MAX_COUNT or c > MAX_COUNT or tag in cells:
            contents.refused += 1
            continue
        cells[tag] = (a, b, c)
    return contents
