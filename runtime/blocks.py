"""The block lists a store keeps its host data in — the K/V rows (``HostKV``) and the key sketch
(``LSHIndex``) — with the sharing between forks and the copy on write that go with it, once; and
``host_empty``, the host allocation under every block.

Items (tokens, keys) are appended in order; block i holds items [starts[i], starts[i+1]) from its own
item 0 (the last block: up to ``size`` items).  An unforked list's blocks start at multiples of ``size``;
a fork's own first block starts on a ``page`` (the kernel's per-page address table takes both).
"""

from __future__ import annotations

import bisect
import math
import mmap
from collections.abc import Callable

import torch

_HUGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB base pages)


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool = False, huge: bool = False) -> torch.Tensor:
    """An uninitialised host tensor on pages of its own: an anonymous mapping, so that no page is resident
    until it is written, and the whole of it goes back to the system when the tensor dies.  (From the
    malloc heap, a large block often lands on pages that freed temporaries have already touched: a fork's
    block, of which a decode writes a few rows, then costs its whole size in resident memory.)

    ``huge``: ask for transparent huge pages, the mapping aligned to one (retrieval reads scattered rows
    of a large store: with 4 KiB pages nearly every row is a TLB miss).  ``pin``: page-locked memory for an
    accelerator's copies, from torch's pinned allocator (neither applies)."""
    n = math.prod(shape) * dtype.itemsize
    if pin or n == 0:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    huge = huge and n >= _HUGE
    pad = _HUGE if huge else 0
    area = mmap.mmap(-1, n + pad)  # private, anonymous, zero-filled on first touch; freed with the tensor
    if huge and hasattr(area, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP unavailable: 4 KiB pages
            pass
    raw = torch.frombuffer(area, dtype=torch.uint8)  # holds the mapping alive
    skip = -raw.data_ptr() % _HUGE if huge else 0
    return raw[skip:skip + n].view(dtype).view(shape)


class Blocks:
    """An append-only list of items in blocks of ``size`` items, each block a tensor that ``new`` allocates
    (its owner knows along which dimension the items lie); forks share the blocks below their fork point.

    Below ``shared_below`` a block may be read by another list, so it is copied before it is written
    (``writable``: a crop below the fork point, a beam reorder); ``owned`` are those copied since.  Items
    are append-only, so a decode never copies.  ``version`` changes whenever a block is added or replaced:
    what is derived from the list (views, the kernel's start table) is rebuilt only then."""

    def __init__(self, size: int, page: int, new: Callable[..., torch.Tensor]):
        """``new(huge=...)`` allocates a block (``host_empty``); it must not hold the list's owner (a fork's
        list keeps it)."""
        self.size, self.page, self.new = size, page, new
        self.tensors: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.shared_below = 0
        self.owned: set[int] = set()
        self.version = 0
        self._kernel: tuple[int, torch.Tensor | None] = (-1, None)

    @classmethod
    def regular(cls, tensors: list[torch.Tensor], size: int, page: int, new: Callable[..., torch.Tensor]) -> Blocks:
        """A list whose block i is ``tensors[i]``, starting at i · size (a loaded context's: not copied)."""
        blocks = cls(size, page, new)
        blocks.tensors, blocks.starts = list(tensors), [i * size for i in range(len(tensors))]
        return blocks

    def __len__(self) -> int:
        return len(self.tensors)

    def end(self, i: int) -> int:
        """Where block i's items end: the next block's start, or its capacity."""
        return self.starts[i + 1] if i + 1 < len(self.starts) else self.starts[i] + self.size

    def count(self, i: int, n: int) -> int:
        """How many of the first n items block i holds."""
        return max(0, min(self.end(i), n) - self.starts[i])

    def find(self, at: int) -> int:
        """The block holding item ``at`` (the last block starting at or before it; −1: none)."""
        return bisect.bisect_right(self.starts, at) - 1

    def for_write(self, at: int) -> tuple[int, int]:
        """(i, end): the block that item ``at`` goes to, and where that block ends — a new block when ``at``
        is past the last one, a copy when another list may read it."""
        i = self.find(at)
        if i < 0 or at >= self.end(i):
            self.add(at)
            i = len(self.tensors) - 1
        self.writable(i)
        return i, self.end(i)

    def add(self, start: int, huge: bool = True) -> None:
        self.tensors.append(self.new(huge=huge))
        self.starts.append(start)
        self.version += 1

    def writable(self, i: int) -> None:
        """Block i is about to be written: copy it first if another list may read it."""
        if self.starts[i] < self.shared_below and i not in self.owned:
            copy = self.new(huge=True)
            copy.copy_(self.tensors[i])
            self.tensors[i] = copy
            self.owned.add(i)
            self.version += 1

    def fork(self, n: int) -> tuple[Blocks, int]:
        """(child, n0): a list of the first n items that shares this one's blocks below n0 = n rounded down
        to a page, with an empty block of its own from n0 on (the caller copies items [n0, n))."""
        n0 = n // self.page * self.page
        keep = bisect.bisect_left(self.starts, n0)  # the blocks that start below the fork point
        child = Blocks(self.size, self.page, self.new)
        child.tensors, child.starts = self.tensors[:keep], self.starts[:keep]
        child.shared_below = n0
        self.shared_below = max(self.shared_below, n0)
        self.owned -= set(range(keep))
        if self.tensors:  # (its own items are few: no huge pages, whose first touch costs 2 MiB each)
            child.add(n0, huge=False)
        return child, n0

    def kernel_starts(self) -> torch.Tensor | None:
        """The blocks' starts as the kernel takes them: None when block i starts at i · size."""
        if self._kernel[0] != self.version:
            regular = all(st == i * self.size for i, st in enumerate(self.starts))
            self._kernel = (self.version, None if regular else torch.tensor(self.starts, dtype=torch.long))
        return self._kernel[1]
