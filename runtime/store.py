"""``KVStore``, the one store: per (sequence, attention site) a static part on the model's device (S sink
slots + a W-slot window ring) and the rest of the tokens in host memory, each token stored once, with the
split attention over them (static part on the device, host part by the C++ kernel, exact LSE merge) and,
on CUDA, the host <-> device overlap.

Shapes: B batch, H query heads, Hkv kv heads, Tq query tokens, D head_dim, S sink_size, W window_size.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from kvpass.cpu_ops import lsh_attention
from kvpass.lowering import merge_partials, static_attention
from kvpass.lowering.reference import ESTIMATORS, ring_slot, stride_offsets
from kvpass.runtime.blocks import Blocks, host_empty
from kvpass.runtime.config import Options, parse_options
from kvpass.runtime.lsh import LSHIndex, take_rows

# query rows x offloaded keys one sketch kernel call may score: its scratch is a score (4 B) per pair, and
# where it lists the keys above each row's threshold, room for a position and a score (8 B) per pair more
SKETCH_SCORES = 1 << 24


def kernel_threads(cpu_threads: int, device: torch.device) -> int:
    """OpenMP threads of the CPU kernel: ``cpu_threads`` when given (> 0); else torch's setting, less one
    when the model runs on an accelerator — that core is left to the thread driving the device (and the
    tokenizer, the data pipeline), which would otherwise deschedule a kernel thread mid-step and make the
    whole team wait a time slice for it (docs/benchmarks.md: "On a busy host").  torch's own setting is not touched."""
    if cpu_threads > 0:
        return cpu_threads
    n = torch.get_num_threads()
    return n if device.type == "cpu" else max(1, n - 1)

class HostKV:
    """Append-only host store of K and V, in ``Blocks`` of ``block_size`` tokens: growing never copies what
    is stored, and forks (``fork``) share the blocks below their fork point (a page of 64 tokens).

    A block is one [B, Hkv, block_size, 2, D] allocation (K and V of a token adjacent: the CPU reads a
    retrieved token's K and V as one contiguous 2·D row — one DRAM page, adjacent-line prefetch; pinned
    when the model runs on an accelerator); ``k_blocks`` / ``v_blocks`` are its [B, Hkv, block_size, D]
    views, token stride 2·D, as the kernel takes them.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int = 4096, pin: bool = False, *, blocks: Blocks | None = None):
        self.shape = (batch, num_kv_heads, block_size, head_dim)
        self.dtype, self.block_size, self.pin = dtype, block_size, pin
        new = functools.partial(host_empty, (batch, num_kv_heads, block_size, 2, head_dim), dtype, pin=pin)
        self.blocks = blocks or Blocks(block_size, math.gcd(block_size, 64), new)
        self.length = 0
        self._views: tuple[int, list[torch.Tensor], list[torch.Tensor]] = (-1, [], [])

    @property
    def kv_blocks(self) -> list[torch.Tensor]:
        return self.blocks.tensors

    def _kv_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._views[0] != self.blocks.version:
            kv = self.blocks.tensors
            self._views = (self.blocks.version, [t[:, :, :, 0] for t in kv], [t[:, :, :, 1] for t in kv])
        return self._views[1], self._views[2]

    @property
    def k_blocks(self) -> list[torch.Tensor]:
        return self._kv_views()[0]

    @property
    def v_blocks(self) -> list[torch.Tensor]:
        return self._kv_views()[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D] on any device; copied to host memory in the store's dtype."""
        t0, T = 0, k.shape[2]
        while t0 < T:
            i, end = self.blocks.for_write(self.length)
            n = min(end - self.length, T - t0)
            used = self.length - self.blocks.starts[i]
            kv = self.blocks.tensors[i]
            kv[:, :, used:used + n, 0].copy_(k[:, :, t0:t0 + n])
            kv[:, :, used:used + n, 1].copy_(v[:, :, t0:t0 + n])
            self.length += n
            t0 += n

    def views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored tokens as per-block views [B, Hkv, n_i, D] (no copies), in position order."""
        ks, vs = [], []
        for i, (kb, vb) in enumerate(zip(*self._kv_views())):
            n = self.blocks.count(i, self.length)
            if n <= 0:
                break
            ks.append(kb[:, :, :n])
            vs.append(vb[:, :, :n])
        return ks, vs

    def truncate(self, n: int) -> None:
        """Forget the tokens from the n-th on (``KVStore.crop``); the blocks stay, to be written over."""
        self.length = min(self.length, n)

    def take_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Batch rows dst become copies of rows src (in place; see ``KVStore.reorder``)."""
        for i in range(len(self.blocks)):
            self.blocks.writable(i)
            take_rows(self.blocks.tensors[i], dst, src)

    def fork(self) -> HostKV:
        """A store of the same tokens that shares this one's blocks (``Blocks.fork``)."""
        blocks, n0 = self.blocks.fork(self.length)
        child = HostKV(*self.shape[:2], self.shape[3], self.dtype, self.block_size, self.pin, blocks=blocks)
        child.length = n0
        if self.length > n0:  # the fork point's page, copied
            j = self.blocks.find(n0)
            at, m = n0 - self.blocks.starts[j], self.length - n0
            child.append(self.k_blocks[j][:, :, at:at + m], self.v_blocks[j][:, :, at:at + m])
        return child

    def packed(self) -> torch.Tensor:
        """The stored tokens in regular blocks, one tensor: [n_blocks, B, Hkv, block_size, 2, D] (a copy;
        what ``from_packed`` takes back — a saved context)."""
        b, h, bs, d = self.shape
        n_blocks = -(-self.length // bs)
        flat = torch.zeros(b, h, n_blocks * bs, 2, d, dtype=self.dtype)
        at = 0
        for i, kv in enumerate(self.blocks.tensors):
            n = self.blocks.count(i, self.length)
            flat[:, :, at:at + n] = kv[:, :, :n]
            at += n
        return flat.view(b, h, n_blocks, bs, 2, d).permute(2, 0, 1, 3, 4, 5).contiguous()

    @classmethod
    def from_packed(cls, packed: torch.Tensor, length: int) -> HostKV:
        """A store whose blocks are views of ``packed`` ([n_blocks, B, Hkv, block_size, 2, D], from ``packed``;
        memory-mapped or not: nothing is copied)."""
        n_blocks, b, h, bs, _, d = packed.shape
        if length > n_blocks * bs:
            raise ValueError(f"kvpass: {length} host tokens do not fit {n_blocks} blocks of {bs}")
        host = cls(b, h, d, packed.dtype, bs)
        host.blocks = Blocks.regular(list(packed.unbind(0)), bs, host.blocks.page, host.blocks.new)
        host.length = length
        return host

    def kernel_blocks(self) -> tuple[int, torch.Tensor | None]:
        """(block_size, block_starts) for the kernel: this store's blocks as ``lsh_attention`` takes them —
        (block size, None) when block i starts at i · block_size, else (page, starts)."""
        starts = self.blocks.kernel_starts()
        return (self.block_size, None) if starts is None else (self.blocks.page, starts)

    def block_bytes(self) -> dict[int, tuple[int, int]]:
        """Per block, by its address: (bytes of the tokens this store keeps in it, bytes allocated)."""
        b, h, _, d = self.shape
        token = 2 * b * h * d * self.dtype.itemsize
        return {kv.data_ptr(): (self.blocks.count(i, self.length) * token, kv.nbytes)
                for i, kv in enumerate(self.blocks.tensors)}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens (one copy of K and V each)."""
        b, h, _, d = self.shape
        return 2 * self.length * b * h * d * self.dtype.itemsize

    @property
    def reserved_bytes(self) -> int:
        return sum(t.nbytes for t in self.blocks.tensors)


class KVStore:
    """The KV of one sequence batch at one attention site: static part on the model's device, the rest on
    the host with a SimHash index, and the whole split attention over them.  Usable without the compiler
    (serving-engine integration):

        store = KVStore(num_kv_heads=8, head_dim=128, sink_size=4, window_size=64, dtype=torch.bfloat16)
        store.append(k, v)                              # k, v: [B, Hkv, T, D]
        out = store.attend(q)                           # q: [B, H, Tq, D], the newest Tq tokens' queries

    Knobs: an ``Options`` (``options=``) and/or its fields as keywords (sink_size, window_size, lsh_k,
    lsh_l, lsh_threshold, seed, budget, host_block_size, static_backend, overlap), validated by ``Options``.

    Token at absolute position p lives in exactly one place:
      p < S                      → sink slot p                      (device)
      p >= max(S, length - W)    → ring slot S + (p - S) % W        (device)
      otherwise                  → host store, index p - S          (host; indexed by LSH)
    static_k/static_v: [B, Hkv, S+W, D]; static_pos: [S+W] int64 (-1 = empty slot).
    The batch size is taken from the first append (or ``batch=``).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, *, options: Options | dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", batch: int | None = None,
                 site: str = "kvstore", **knobs):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"kvpass: KV dtype {dtype} is not supported (float32, bfloat16, float16)")
        self.options = parse_options(options, **knobs)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.site = site         # the attention site this store serves
        self.buffer = None       # weakref to the model's static cache buffer, when there is one
        self.model_buffer_bytes = 0  # that buffer's K and V bytes (the model keeps them on its device)
        self._centred_for: torch.Tensor | None = None  # the row padding the index's μ excludes (recentre)
        self.handle: torch.Tensor | None = None  # the registry's current handle
        self.masked_steps = 0    # decode steps whose mask was not plain causal (applied exactly, slower)
        self.reorders = self.crops = 0  # batch reorders (beam search) and crops (rejected drafts) followed
        self.cpu_threads = self.options.cpu_threads or 0  # the CPU kernel's threads (kernel_threads; 0: default)
        self.last_scored: torch.Tensor | None = None  # [B, H, Tq] int: host keys scored per query row, last call
        self.last_kept: torch.Tensor | None = None    # [B, H, Tq] int: of them, in the estimate (topk/oracle: ≤ B)
        self.last_query_codes: torch.Tensor | None = None  # [B, H, Tq, L] the kernel's, at the last call
        # [B, Hkv, 3] int64, the kernel's count of what the last call read per kv head: code bytes scanned,
        # distinct K rows, distinct V rows (``last_step_reads``)
        self.last_reads: torch.Tensor | None = None
        self.batch = 0
        self.reset()
        if batch is not None:
            self._allocate(batch)

    @property
    def sink_size(self) -> int:
        return self.options.sink_size

    @property
    def window_size(self) -> int:
        return self.options.window_size

    @property
    def overlap(self) -> bool:
        """CUDA: the CPU part runs while the device computes the static part."""
        return self.options.overlap

    def reset(self) -> None:
        """Forget every token (a new sequence); keeps the configuration."""
        self.length = 0
        self.last_positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.masked_steps, self.last_scored, self.last_kept, self.last_reads = 0, None, None, None
        if self.batch:
            self._allocate(self.batch)

    def _allocate(self, batch: int) -> None:
        S, W, Hkv, D = self.sink_size, self.window_size, self.num_kv_heads, self.head_dim
        self.batch = batch
        self.static_k = torch.zeros(batch, Hkv, S + W, D, dtype=self.dtype, device=self.device)
        self.static_v = torch.zeros_like(self.static_k)
        self.static_pos = torch.full((S + W,), -1, dtype=torch.long, device=self.device)
        self.host = HostKV(batch, Hkv, D, self.dtype, self.options.host_block_size, pin=self.device.type == "cuda")
        self.index = LSHIndex(batch, Hkv, D, self.options, site=self.site)

    def _to_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.host.append(k, v)
        self.index.add(k, lambda: torch.cat(self.host.views()[0], 2))

    def observe_queries(self, q: torch.Tensor) -> None:
        """The queries [B, H, T, D] of tokens just appended whose attention the model computed itself (a
        prefill): a rotated index fits its code to them (``LSHIndex.observe``); other indexes ignore them."""
        self.index.observe(q)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append T tokens at positions [length, length+T).  k, v: [B, Hkv, T, D]."""
        if not self.batch:
            self._allocate(k.shape[0])
        S, W, L, T = self.sink_size, self.window_size, self.length, k.shape[2]
        if tuple(k.shape) != (self.batch, self.num_kv_heads, T, self.head_dim) or k.shape != v.shape:
            raise ValueError(f"kvpass: append of k {tuple(k.shape)} / v {tuple(v.shape)} to a store of "
                             f"[B={self.batch}, Hkv={self.num_kv_heads}, T, D={self.head_dim}]")
        k, v = k.to(self.device, self.dtype), v.to(self.device, self.dtype)
        end = L + T
        # sinks
        n_sink = max(0, min(S, end) - L)
        if n_sink:
            self.static_k[:, :, L:L + n_sink] = k[:, :, :n_sink]
            self.static_v[:, :, L:L + n_sink] = v[:, :, :n_sink]
            self.static_pos[L:L + n_sink] = torch.arange(L, L + n_sink, device=self.device)
        # tokens at positions [host_from, host_to) leave (or skip) the window for the host store; the ring
        # holds [host_from, L) — the last W tokens, or fewer after a crop
        host_from = S + (self.host.length if self.batch else 0)
        host_to = max(host_from, end - W)
        old_to = min(host_to, L)  # part still in the ring
        if old_to > host_from:
            slots = torch.tensor([ring_slot(p, S, W) for p in range(host_from, old_to)], device=self.device)
            self._to_host(self.static_k.index_select(2, slots), self.static_v.index_select(2, slots))
        new_from = max(host_from, L)
        if host_to > new_from:
            self._to_host(k[:, :, new_from - L:host_to - L], v[:, :, new_from - L:host_to - L])
        # the newest tokens enter the ring
        ring_from = max(S, L, host_to)
        if end > ring_from:
            positions = list(range(ring_from, end))
            slots = torch.tensor([ring_slot(p, S, W) for p in positions], device=self.device)
            src = torch.arange(ring_from - L, end - L, device=self.device)
            self.static_k.index_copy_(2, slots, k.index_select(2, src))
            self.static_v.index_copy_(2, slots, v.index_select(2, src))
            self.static_pos.index_copy_(0, slots, torch.tensor(positions, device=self.device))
        self.length = end
        self.last_positions = torch.arange(L, end, device=self.device)

    def reorder(self, rows: torch.Tensor) -> None:
        """Batch row i becomes a copy of row ``rows[i]`` (beam search's cache reorder), in every part: static
        slots, host KV, index.  Only the rows that change are copied; rows may repeat (a beam forks)."""
        rows = rows.to(torch.long).cpu()
        if rows.shape != (self.batch,) or bool((rows < 0).any() | (rows >= self.batch).any()):
            raise ValueError(f"kvpass: reorder of a {self.batch}-row store by rows {rows.tolist()}: a reorder "
                             f"keeps the batch size and names existing rows")
        dst = torch.nonzero(rows != torch.arange(self.batch)).flatten()
        if not dst.numel():
            return
        src = rows[dst]
        for t in (self.static_k, self.static_v):
            take_rows(t, dst, src)
        self.host.take_rows(dst, src)
        self.index.take_rows(dst, src)
        self.last_scored = self.last_kept = self.last_query_codes = self.last_reads = None
        self.reorders += 1

    def fork(self) -> KVStore:
        """An independent store of the same tokens (a forked sequence: ``copy.deepcopy`` of a cache).  It
        shares this store's host KV blocks and index segments — append-only, copied only where either store
        would write what the other reads (``HostKV``) — and copies the static slots (sinks + window) and
        the index's small per-row parts.  Either store may be dropped without touching the other."""
        child = copy.copy(self)
        child.static_k, child.static_v = self.static_k.clone(), self.static_v.clone()
        child.static_pos, child.last_positions = self.static_pos.clone(), self.last_positions.clone()
        child.host, child.index = self.host.fork(), self.index.fork()
        if self._centred_for is not None:
            child._centred_for = self._centred_for.clone()
        child.handle = child.serial = child.buffer = child._pinned = None
        child.model_buffer_bytes = 0
        child.last_scored = child.last_kept = child.last_query_codes = child.last_reads = None
        child.masked_steps = child.reorders = child.crops = 0
        return child

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(meta, tensors): everything this store holds, as JSON-able values and named CPU tensors —
        a saved context (``kvpass.save_context``); ``from_state`` rebuilds the store."""
        meta = {"site": self.site, "options": self.options.to_op_string(), "batch": self.batch,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "dtype": str(self.dtype).split(".")[1],
                "length": self.length, "host_length": self.host.length}
        tensors = {"static_k": self.static_k, "static_v": self.static_v, "static_pos": self.static_pos,
                   "last_positions": self.last_positions, "host": self.host.packed()}
        if self._centred_for is not None:
            tensors["centred_for"] = self._centred_for
        index_meta, index_tensors = self.index.state()
        meta["index"] = index_meta
        tensors.update({f"index.{k}": t for k, t in index_tensors.items()})
        return meta, {k: t.detach().cpu().contiguous() for k, t in tensors.items()}

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> KVStore:
        """The store ``state`` described; the host KV and the index's blocks are views of ``tensors`` (a
        memory-mapped file's stay mapped), the static slots go to ``device``."""
        store = cls(meta["num_kv_heads"], meta["head_dim"], options=Options.from_op_string(meta["options"]),
                    dtype=getattr(torch, meta["dtype"]), device=device, batch=meta["batch"], site=meta["site"])
        for name in ("static_k", "static_v", "static_pos", "last_positions"):
            setattr(store, name, tensors[name].to(store.device))
        store.length = meta["length"]
        store.host = HostKV.from_packed(tensors["host"], meta["host_length"])
        store.index = LSHIndex.from_state(meta["index"], {k[6:]: t for k, t in tensors.items() if k.startswith("index.")},
                                          store.batch, store.num_kv_heads, store.head_dim, store.options, site=store.site)
        store._centred_for = tensors.get("centred_for")
        return store

    def crop(self, length: int) -> None:
        """Forget the tokens at positions >= length (``cache.crop``: assisted or speculative decoding rejecting
        a draft).  Their static slots are emptied and the host store and its index cut back; the ring then
        holds fewer than W tokens until new ones come.  Refused (ValueError) only where the LSH index
        (retriever "lsh") has sealed some of those tokens into a bucket segment."""
        S, W, L = self.sink_size, self.window_size, self.length
        if not 0 <= length <= L:
            raise ValueError(f"kvpass: crop to {length} tokens of a store holding {L}")
        if length == L:
            return
        if self.tokens_offloaded > max(0, length - S):
            try:
                self.index.truncate(max(0, length - S))
            except ValueError as e:
                raise ValueError(f"kvpass: site {self.site}: cannot drop the last {L - length} tokens: {e}. "
                                 f"Draft fewer tokens, or use the sketch retriever (the defaults)") from None
            self.host.truncate(max(0, length - S))
        slots = torch.tensor([p if p < S else ring_slot(p, S, W) for p in range(length, L)], device=self.device)
        self.static_pos[slots[self.static_pos[slots] >= length]] = -1  # the slots of dropped tokens only
        self.length = length
        self.last_positions = torch.empty(0, dtype=torch.long, device=self.device)
        self.crops += 1

    # ------------------------------------------------------------ attention

    @property
    def last_keys_read(self) -> float:
        """Mean host keys scored per query row at the last host attention (0 before any)."""
        return 0.0 if self.last_scored is None else float(self.last_scored.float().mean())

    @property
    def last_step_reads(self) -> dict[str, int]:
        """What the CPU kernel read at the last host attention, counted by the kernel over every batch row and
        kv head: ``code_bytes`` (the sketch scanned, every pass), ``k_rows`` / ``v_rows`` (distinct host keys
        whose K / V row some query row read), ``row_bytes`` (those rows' bytes), and ``dense_bytes`` (every
        host key's K and V: what dense attention over them reads).  All 0 before any."""
        n = self.host.length if self.batch else 0
        if self.last_reads is None:
            return dict.fromkeys(("code_bytes", "k_rows", "v_rows", "row_bytes", "dense_bytes"), 0)
        code, k_rows, v_rows = (int(x) for x in self.last_reads.sum((0, 1)))
        row = self.head_dim * self.dtype.itemsize
        return {"code_bytes": code, "k_rows": k_rows, "v_rows": v_rows, "row_bytes": (k_rows + v_rows) * row,
                "dense_bytes": 2 * self.batch * self.num_kv_heads * n * row}

    def resolve_budget(self, budget: float | None, n: int | None = None) -> int:
        """Keys kept by topk/oracle: an int is a count, a float in (0, 1] a fraction of the host keys (of n
        keys when given: a padded row's own)."""
        budget = self.options.budget if budget is None else budget
        n = (self.host.length if self.batch else 0) if n is None else n
        if (err := Options.knob("budget").error("budget", budget, self.options)) is not None:
            raise ValueError(f"kvpass: {err}")
        return max(1, round(budget * n)) if isinstance(budget, float) else min(budget, n)

    def tail_sample(self, estimator: str, budget_n: int, n: int) -> tuple[int, torch.Tensor | None]:
        """The tail sample of this step: (tail_stride, where it starts for each (batch row, kv head), int64
        [B, Hkv]) when ``estimator`` keeps a head of ``budget_n`` < ``n`` host keys (topk/oracle), else (0, None)."""
        r = self.options.tail_stride if estimator in ("topk", "oracle") and budget_n < n else 0
        if not r:
            return 0, None
        return r, stride_offsets(self.options.seed, self.site, self.length, self.batch, self.num_kv_heads, r)

    def attend_host(self, q: torch.Tensor, *, estimator: str | None = None, budget: float | None = None,
                    scale: float | None = None, with_static: bool = False,
                    row_pad: torch.Tensor | None = None, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [B, H, Tq, D] over the host tokens, computed by the CPU.  Returns out
        [B, H, Tq, D] fp32 and lse [B, H, Tq] fp32 on q's device (lse = -inf where nothing is there).

        with_static (a CPU store only): the static part (sinks + window, causal for the newest Tq tokens)
        is attended exactly in the same pass, so out/lse are the whole attention — no merge needed.
        estimator: None = the store's (``options.estimator``).  row_pad: int64 [B], each batch row's first
        real position (left padding before it: never attended, never counted), or None.  softcap > 0: the
        scores are soft-capped, softcap · tanh(s / softcap) (Gemma 2)."""
        estimator = self.options.estimator if estimator is None else estimator
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        qh = q.detach().to("cpu", torch.float32)
        n, idx = self.host.length, self.index
        if estimator == "sample" and self.index.sketch:
            raise ValueError("kvpass: estimator 'sample' needs the LSH index; this store keeps the key sketch "
                             "(build it with estimator='sample' or retriever='lsh')")
        if estimator not in ESTIMATORS or estimator == "none":
            raise ValueError(f"kvpass: the host part's estimator must be one of {list(ESTIMATORS[:-1])}, got "
                             f"{estimator!r}")
        static = {}
        if with_static:
            q_pos = torch.arange(self.length - q.shape[2], self.length)
            allowed = (self.static_pos >= 0)[None, :] & (self.static_pos[None, :] <= q_pos[:, None])
            if row_pad is not None:  # [B, Tq, NS]: a row's padding slots are not its keys
                allowed = allowed[None] & (self.static_pos[None, None, :] >= row_pad.cpu()[:, None, None])
            static = {"static_k": self.static_k, "static_v": self.static_v, "static_allowed": allowed}
        if row_pad is not None:
            static["row_lo"] = (row_pad.cpu() - self.sink_size).clamp(0, n)
            if idx.built and (self._centred_for is None or not torch.equal(self._centred_for, row_pad.cpu())):
                # the index was built with the padding's keys in μ: once per padded sequence, rebuild it
                # with each row's μ (and sketch scale) over its own keys
                idx.recentre(torch.cat(self.host.views()[0], 2), static["row_lo"])
                self._centred_for = row_pad.cpu().clone()
        budget_n = self.resolve_budget(budget) if n else 0
        if estimator == "exact" or (estimator in ("sample", "topk") and not idx.built):
            estimator, budget_n = "oracle", n  # every key (below min_keys, no index: reading them all is cheap)
        elif row_pad is not None and estimator in ("topk", "oracle"):  # each row: its share of its own keys
            static["row_budget"] = torch.tensor([self.resolve_budget(budget, n - int(lo)) for lo in static["row_lo"]])
        stride, offset = self.tail_sample(estimator, budget_n, n)
        if stride:
            static.update(stride=stride, stride_offset=offset)
        mu = idx.mu if idx.built else torch.zeros(self.batch, self.num_kv_heads, self.head_dim)
        meta = torch.tensor(idx.seg_meta, dtype=torch.long).reshape(-1, 2)
        rows = max(1, qh.shape[2])
        sketch = estimator == "topk" and idx.sketch
        if sketch and not idx.coded:  # a rotated index: its unit fitted to the prefill's queries (else these)
            idx.code(idx.q_sq if idx.q_rows else idx.query_moments(qh), torch.cat(self.host.views()[0], 2),
                     static.get("row_lo"))
        if sketch:
            static["sketch_blocks"] = idx.sketch_blocks
            # the kernel keeps a sketch score per query row and key: bounded (192 MiB) by query chunks
            rows = max(1, SKETCH_SCORES // max(1, self.batch * qh.shape[1] * n))
        block_size, static["block_starts"] = self.host.kernel_blocks()
        if sketch:
            static["sketch_starts"] = idx.kernel_sketch_starts()
        parts = []
        for t0 in range(0, max(1, qh.shape[2]), rows):  # host keys precede every query: chunks are independent
            kw = dict(static)
            if with_static:
                kw["static_allowed"] = static["static_allowed"][..., t0:t0 + rows, :]
            if sketch:  # the query rows as the sketch's codes are scaled (and rotated)
                qc = qh[:, :, t0:t0 + rows]
                B, H, Tq, D = qc.shape
                qs = idx.query_rows(qc.reshape(B, self.num_kv_heads, H // self.num_kv_heads, Tq, D))
                kw.update(sketch_query=qs.reshape(B, H, Tq, D), sketch_bits=idx.sketch_bits)
            parts.append(lsh_attention(
                qh[:, :, t0:t0 + rows].contiguous(), idx.proj("cpu"), mu, self.host.k_blocks, self.host.v_blocks,
                block_size, n, idx.seg_ids, idx.seg_starts, meta, idx.tail, idx.tail_base,
                idx.tail_len, lsh_k=idx.lsh_k, threshold=idx.threshold, estimator=estimator, budget=budget_n,
                scale=scale, threads=kernel_threads(self.cpu_threads, self.device), softcap=softcap, **kw))
        outs = list(zip(*parts))
        out, lse, self.last_scored, self.last_kept, self.last_query_codes = (torch.cat(x, 2) for x in outs[:5])
        self.last_reads = sum(outs[5])  # a long block's query chunks: each chunk's reads, summed
        return out.to(q.device), lse.to(q.device)

    def attend(self, q: torch.Tensor, *, estimator: str | None = None, budget: float | None = None,
               scale: float | None = None, row_pad: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
        """Attention of the newest Tq tokens' queries q [B, H, Tq, D] over every stored token (causal
        inside the block): static part on the device + host part by the CPU, merged exactly by LSE.
        estimator: "sample" | "topk" | "oracle" | "exact" | "none" (static part only); None = the store's
        (``options.estimator``).  row_pad: int64 [B], each batch row's first real position — a left-padded
        batch: the padding is never attended (sinks included), never retrieved, never counted — or None.
        softcap > 0: every score is soft-capped, softcap · tanh(s / softcap) (Gemma 2's logit capping).
        Returns [B, H, Tq, D] in q's dtype."""
        estimator = self.options.estimator if estimator is None else estimator
        if q.shape[2] > self.length:
            raise ValueError(f"kvpass: {q.shape[2]} queries but only {self.length} tokens stored")
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        backend = self.static_backend()
        if self.device.type == "cpu" and estimator != "none" and backend == "torch":
            # one fused CPU pass over the static slots and the host keys, no merge
            out, _ = self.attend_host(q, estimator=estimator, budget=budget, scale=scale, with_static=True,
                                      row_pad=row_pad, softcap=softcap)
            return out.to(q.device, q.dtype)
        if row_pad is not None:  # the static part with the padding masked (torch), the host part by the CPU
            return self._attend_padded(q, estimator, budget, scale, row_pad, softcap)
        if self.device.type == "cuda" and estimator != "none" and self.overlap:
            return attend_overlapped(self, q, _CUDA, estimator=estimator, budget=budget, scale=scale,
                                     backend=backend, softcap=softcap)
        q_pos = torch.arange(self.length - q.shape[2], self.length, device=self.device)
        if backend == "triton":  # one device pass: static part + merge of the CPU partial
            from kvpass.lowering.triton_static import static_attention_triton

            o_d = l_d = None
            if estimator != "none":
                o_d, l_d = self.attend_host(q, estimator=estimator, budget=budget, scale=scale, softcap=softcap)
            out, _ = static_attention_triton(q.to(self.device), self.static_k, self.static_v, self.static_pos,
                                             q_pos, scale, o_d, l_d, softcap=softcap)
            return out.to(q.device, q.dtype)
        out_s, lse_s = static_attention(q.to(self.device), self.static_k, self.static_v, self.static_pos, q_pos,
                                        scale, softcap=softcap)
        if estimator == "none":
            return out_s.to(q.device, q.dtype)
        out_d, lse_d = self.attend_host(q, estimator=estimator, budget=budget, scale=scale, softcap=softcap)
        out, _ = merge_partials(out_s, lse_s, out_d.to(self.device), lse_d.to(self.device))
        return out.to(q.device, q.dtype)

    def _attend_padded(self, q, estimator, budget, scale, row_pad, softcap=0.0) -> torch.Tensor:
        q_pos = torch.arange(self.length - q.shape[2], self.length, device=self.device)
        cols = torch.arange(self.length, device=self.device)
        allowed = (cols[None, :] <= q_pos[:, None])[None] & (cols[None, None, :] >= row_pad.to(self.device)[:, None, None])
        bias = torch.zeros(allowed.shape, device=self.device).masked_fill(~allowed, float("-inf"))[:, None, None]
        out, lse = static_attention(q.to(self.device), self.static_k, self.static_v, self.static_pos, q_pos, scale,
                                    bias, softcap)
        if estimator != "none":
            out, _ = merge_partials(out, lse, *(t.to(self.device) for t in self.attend_host(
                q, estimator=estimator, budget=budget, scale=scale, row_pad=row_pad, softcap=softcap)))
        return out.to(q.device, q.dtype)

    def static_backend(self) -> str:
        """"triton" or "torch" for this store's device (static_backend "auto": triton on CUDA)."""
        want = self.options.static_backend
        if want == "torch" or (want == "auto" and self.device.type != "cuda"):
            return "torch"
        try:
            from kvpass.lowering import triton_static
        except ImportError as e:
            if want == "triton":
                raise RuntimeError("kvpass: static_backend='triton' needs the triton package") from e
            return "torch"
        if triton_static.usable(self.device):
            return "triton" if want == "triton" or self.device.type == "cuda" else "torch"
        if want == "triton":
            raise RuntimeError(f"kvpass: static_backend='triton' runs on CUDA devices (or on CPU with "
                               f"TRITON_INTERPRET=1, for tests); this store is on {self.device}")
        return "torch"

    # ------------------------------------------------------------ accounting

    def stats(self) -> dict[str, float]:
        """Bytes and tokens: device (sinks + window) and host KV, index, projection; keys read."""
        n = self.host.length if self.batch else 0
        return {
            "tokens": self.length,
            "tokens_offloaded": n,
            "device_kv_bytes": self.device_bytes,
            "host_kv_bytes": self.host_bytes,
            "index_bytes": self.index_bytes,
            "projection_bytes": self.index.projection_bytes if self.batch else 0,
            "keys_read_last": self.last_keys_read,
            "keys_read_fraction_last": self.last_keys_read / n if n else 0.0,
            **{f"{k}_last": v for k, v in self.last_step_reads.items()},
        }

    @property
    def device_bytes(self) -> int:
        return self.static_k.nbytes + self.static_v.nbytes if self.batch else 0

    @property
    def host_bytes(self) -> int:
        return self.host.nbytes if self.batch else 0

    @property
    def index_bytes(self) -> int:
        return self.index.index_bytes if self.batch else 0

    @property
    def tokens_offloaded(self) -> int:
        return self.host.length if self.batch else 0


# ---------------------------------------------------------------- host <-> device overlap (CUDA)
#
# One decode step of one layer on an accelerator, overlapped:
#
#   main stream  : ...q ready ─┬─ static part (sinks + window) ────────────────┬─ merge → next ops
#   copy stream  :             └─ q → pinned host ─┐         ┌─ (o_d, lse_d) → device ─┘
#   host thread  :                                 └─ CPU kernel (retrieve, score, accumulate)
#
# What overlaps: the device's static part with the q transfer and the CPU kernel, and both transfers
# with whatever the main stream still has queued.  The host thread waits for q alone (an event), not for
# the device to drain.  What cannot: the next layer needs this layer's attention output, so for one
# sequence batch the CPU kernel of layer i + 1 cannot start before the merge of layer i — CPU work runs
# ahead of the device only within a layer.  (Splitting a batch into two halves that alternate between
# device and CPU would overlap across layers; not built.)


class _Streams:
    """What the overlapped step needs from the accelerator runtime (CUDA here; a test substitutes a
    synchronous stand-in to run the same code on a CPU)."""

    pin_memory = True

    def __init__(self):
        self._side: dict = {}

    def current(self, device):
        return torch.cuda.current_stream(device)

    def side(self, device):
        key = str(device)
        if key not in self._side:
            self._side[key] = torch.cuda.Stream(device)
        return self._side[key]

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self):
        return torch.cuda.Event()


_CUDA = _Streams()


class _Pinned:
    """A store's page-locked staging buffers for one query block shape: q out, (o_d, lse_d) back."""

    def __init__(self, shape, pin: bool):
        B, H, Tq, D = shape
        self.shape = tuple(shape)
        self.q = torch.empty(B, H, Tq, D, dtype=torch.float32, pin_memory=pin)
        self.out = torch.empty(B, H, Tq, D, dtype=torch.float32, pin_memory=pin)
        self.lse = torch.empty(B, H, Tq, dtype=torch.float32, pin_memory=pin)
        self.free = None  # event: the last results have left self.out / self.lse


def attend_overlapped(store: KVStore, q: torch.Tensor, streams: _Streams, *, estimator: str, budget, scale: float,
                      backend: str, softcap: float = 0.0) -> torch.Tensor:
    """``KVStore.attend`` for a store on an accelerator, with the CPU part overlapped with the device's
    static part (the diagram above).  Same result as the sequential path up to float rounding (the merge
    runs as a separate step instead of inside the Triton kernel)."""
    dev = store.device
    main, side = streams.current(dev), streams.side(dev)
    pin = getattr(store, "_pinned", None)
    if pin is None or pin.shape != tuple(q.shape):
        pin = store._pinned = _Pinned(q.shape, streams.pin_memory)
    qf = q.detach().float().contiguous()
    # 1. q to the host on the copy stream, as soon as the main stream has produced it
    side.wait_stream(main)
    with streams.use(side):
        pin.q.copy_(qf, non_blocking=True)
        q_there = streams.event()
        q_there.record(side)
    if qf.device.type != "cpu":
        qf.record_stream(side)  # read on the copy stream: not to be reused before that copy is done
    # 2. the static part, queued on the device meanwhile
    q_pos = torch.arange(store.length - q.shape[2], store.length, device=dev)
    if backend == "triton":
        from kvpass.lowering.triton_static import static_attention_triton as static
    else:
        static = static_attention
    out_s, lse_s = static(q.to(dev), store.static_k, store.static_v, store.static_pos, q_pos, scale,
                          softcap=softcap)
    # 3. the CPU part, once q (only q) has arrived
    q_there.synchronize()
    if pin.free is not None:
        pin.free.synchronize()
    out_d, lse_d = store.attend_host(pin.q, estimator=estimator, budget=budget, scale=scale, softcap=softcap)
    pin.out.copy_(out_d)
    pin.lse.copy_(lse_d)
    # 4. the results back on the copy stream; the main stream waits for them, then merges
    with streams.use(side):
        o_dev = pin.out.to(dev, non_blocking=True)
        l_dev = pin.lse.to(dev, non_blocking=True)
        pin.free = streams.event()
        pin.free.record(side)
    main.wait_stream(side)
    if o_dev.device.type != "cpu":
        o_dev.record_stream(main)  # allocated on the copy stream, used on the main one
        l_dev.record_stream(main)
    out, _ = merge_partials(out_s, lse_s, o_dev, l_dev)
    return out.to(q.dtype)
