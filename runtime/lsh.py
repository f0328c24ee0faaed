"""SimHash index over the offloaded keys of one store (the hashing maths: ``lowering/reference.py``).

Shapes: B batch, Hkv kv heads, D head_dim, K = lsh_k bits per table, L = lsh_l tables.

code_l(x) = Σ_j [ (x − μ)·R[:, lK + j] > 0 ] << j      (K bits, table l; R: [D, K·L] per kv head)
Keys are centred by μ, the mean of the first ``min_keys``+ offloaded keys, frozen when the index is
built (a moving μ would silently invalidate every stored code).  Until then no index exists and the
estimators read every offloaded key (there are fewer than ``min_keys``).

Layout: sealed segments (C++ bucket tables, ids bit-packed, see ``cpu_ops/csrc/lsh_index.h``)
cover keys [0, tail_base); the newest keys [tail_base, tail_base + tail_len) keep their codes in a
small tail (scanned by the kernel) until ``seal_size`` of them are sealed into a segment.  The prompt's
keys are sealed in bulk, up to 32768 per segment (15-bit ids).
"""

from __future__ import annotations

import copy
import functools

import torch
from kvpass.cpu_ops import lsh_build_segment, lsh_merge_segments
from kvpass.lowering.reference import (
    MIN_KEYS,
    rotated_sketch_codes,
    rotated_sketch_scale,
    rotated_std,
    rotated_unit,
    simhash,
    site_rotation,
    site_seed,
    sketch_codes,
    sketch_rows,
    sketch_scale,
)
from kvpass.runtime.blocks import Blocks, host_empty
from kvpass.runtime.config import Options

MAX_SEGMENT = 32768
SKETCH_BLOCK = 4096  # keys per block of the key sketch (retriever "sketch")


@functools.lru_cache(maxsize=256)
def projection(seed: int, site: str, num_kv_heads: int, head_dim: int, lsh_k: int, lsh_l: int,
               device: str) -> torch.Tensor:
    """The SimHash projection of one site: [Hkv, D, K·L] bf16, Gaussian, from a generator seeded by
    (seed, site) — the same for every sequence through that site, shared between them.  Stored in
    bf16 (the CPU kernel streams it for every decode step; bf16 halves that) and used as exactly these
    values everywhere — keys are hashed with its fp32 upcast — so queries and keys share one R.
    Every kv head gets the same R (each head's estimate uses only its own keys and queries, so sharing
    changes no head's distribution): a head hashes alike whichever heads share its site — under tensor
    parallelism a rank holds a slice of the heads, and its results do not depend on the rank count."""
    gen = torch.Generator().manual_seed(site_seed(seed, site))
    r = torch.randn(head_dim, lsh_k * lsh_l, generator=gen)
    return r.expand(num_kv_heads, -1, -1).contiguous().to(device, torch.bfloat16)


def sketch_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's bytes for sketch codes [B, Hkv, n, D] (int8 values in ±levels): [B, Hkv, n, words, 4],
    which the index stores per tile of 16 keys as [words][16 keys][4 bytes] — one 64-byte load gives the
    kernel 16 keys x 4 bytes, one int8 dot-product instruction's operand.
    int8: byte e of word g = code of dimension 4g + e (words = ⌈D/4⌉; zero past D).
    int4: byte e of word g = (code[8g + e] + 8) | (code[8g + 4 + e] + 8) << 4, unsigned nibbles (words =
    ⌈D/8⌉; code 0 past D) — the low nibbles hold dimensions 8g..8g+3, the high ones 8g+4..8g+7."""
    B, Hkv, n, D = codes.shape
    if bits == 8:
        return torch.nn.functional.pad(codes, (0, -D % 4)).reshape(B, Hkv, n, -1, 4)
    c = (torch.nn.functional.pad(codes, (0, -D % 8)).to(torch.int16) + 8).reshape(B, Hkv, n, -1, 2, 4)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).to(torch.uint8).view(torch.int8)


def take_rows(t: torch.Tensor | None, dst: torch.Tensor, src: torch.Tensor) -> None:
    """t[dst] = t[src] along the batch (first) dimension, in place (views of t stay valid); the right side
    is gathered before it is written, so rows may swap or repeat."""
    if t is not None:
        t[dst.to(t.device)] = t[src.to(t.device)]


class LSHIndex:
    """The SimHash index of one store (one sequence batch at one attention site)."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, options: Options, *, site: str = "",
                 min_keys: int = MIN_KEYS, seal_size: int = 4096):
        self.batch, self.num_kv_heads, self.head_dim, self.site = batch, num_kv_heads, head_dim, site
        # retriever "sketch": no bucket tables; a sketch of every key (k − μ) / scale instead (int8, or int4:
        # ``sketch_bits``), in blocks of SKETCH_BLOCK keys (the kernel scans it).  Nothing is hashed: the kernel's SimHash
        # arguments shrink to one table (a [Hkv, D, K] projection it never reads, not 150)
        self.sketch = options.index in ("sketch", "rotated")
        # retriever "rotated": the sketch of the keys' rotated coordinates (lowering/reference.py:
        # rotated_sketch_codes), in the unit fitted to the queries' mean q² (``q_sq``): the keys are coded at the
        # first step that attends after the index is built (``code``), when queries are there to fit it to
        self.rotated = options.index == "rotated"
        self.unit: torch.Tensor | None = None  # [B, Hkv, D] fp32, rotated: once coded
        self.q_sq: torch.Tensor | None = None  # [B, Hkv, D] fp32, the queries' mean q_d² (to fit / it was fitted to)
        self.q_rows = 0  # query rows per kv head observed in q_sq before coding (``observe``)
        lsh_k, lsh_l = options.lsh_k, 1 if self.sketch else options.lsh_l
        self.lsh_k, self.lsh_l, self.seed = lsh_k, lsh_l, options.seed
        self.threshold = 1 if self.sketch else options.lsh_threshold
        self.sketch_bits = options.sketch_bits
        self.sketch_scale: torch.Tensor | None = None  # [B, Hkv, D] fp32, frozen with μ
        # int8 codes: [B, Hkv, SKETCH_BLOCK / 16, ⌈D/4⌉, 16, 4]; int4: [B, Hkv, SKETCH_BLOCK / 16, ⌈D/8⌉, 16, 4],
        # uninitialised: a tile is written whole, or zeroed before its first key (the kernel reads only the keys
        # it holds, and a fork's own block is mostly never written: its pages stay untouched)
        words = -(-head_dim * self.sketch_bits // 32)
        self.sketch_store = Blocks(SKETCH_BLOCK, 64, functools.partial(
            host_empty, (batch, num_kv_heads, SKETCH_BLOCK // 16, words, 16, 4), torch.int8))
        self.min_keys, self.seal_size = min_keys, min(seal_size, MAX_SEGMENT)
        # a bulk append (a prompt) this large is sealed at once, whatever seal_size says: left in the tail,
        # its codes would be scanned whole at every decode step (at a 2k-token prompt, 150 tables x 2k
        # codes per query row; sealed, a SmolLM2 decode spent 6.7 instead of 11.7 ms a token in the kernel).
        # From 2^K keys on, a segment's bucket starts (2^K x 2 B per table) cost <= 2 B per key per table.
        self.bulk_seal = min(self.seal_size, max(1024, 1 << lsh_k))
        self.mu: torch.Tensor | None = None  # [B, Hkv, D] fp32 (CPU), once built
        self.seg_ids: list[torch.Tensor] = []
        self.seg_starts: list[torch.Tensor] = []
        self.seg_meta: list[tuple[int, int]] = []  # (base, n)
        self.tail = torch.zeros(batch, num_kv_heads, lsh_l, 0, dtype=torch.int16)  # grows up to seal_size
        self.tail_base = self.tail_len = 0
        self.segments_shared = False  # a fork shares the bucket segments: copied before take_rows writes them
        self.n_keys = 0  # keys offloaded so far (all indexed once the index is built)

    @property
    def built(self) -> bool:
        return self.mu is not None

    @property
    def coded(self) -> bool:
        """Every indexed key has its code (a rotated index is built before its first queries come: until
        ``code``, its keys are only counted)."""
        return self.built and (not self.rotated or self.unit is not None)

    def rot(self) -> torch.Tensor:
        """The rotated sketch's rotation of this site, [D, D] fp32 (shared by every sequence through it)."""
        return site_rotation(self.seed, self.site, self.head_dim)

    def query_moments(self, q: torch.Tensor) -> torch.Tensor:
        """The mean q_d² of queries q [B, H, Tq, D] over each kv head's query rows → [B, Hkv, D] fp32 (what
        ``code`` fits the unit to)."""
        B, H, Tq, D = q.shape
        return q.detach().float().cpu().reshape(B, self.num_kv_heads, H // self.num_kv_heads * Tq, D).pow(2).mean(2)

    def observe(self, q: torch.Tensor) -> None:
        """Queries q [B, H, T, D] a rotated index not coded yet will be fitted to (a prefill's, which the
        model attends itself): their q_d² joins the running mean ``q_sq``."""
        if q.shape[2]:
            self.observe_moments(self.query_moments(q), q.shape[1] // self.num_kv_heads * q.shape[2])

    def observe_moments(self, q_sq: torch.Tensor, rows: int) -> None:
        """``observe`` given the queries' mean q_d² [B, Hkv, D] over ``rows`` query rows per kv head."""
        if not self.rotated or self.unit is not None or not rows:
            return
        q_sq = q_sq.float().cpu()
        self.q_sq = q_sq if self.q_sq is None else (self.q_sq * self.q_rows + q_sq * rows) / (self.q_rows + rows)
        self.q_rows += rows

    def code(self, q_sq: torch.Tensor, keys: torch.Tensor, row_lo: torch.Tensor | None = None) -> None:
        """Code a rotated index's keys, every host key [B, Hkv, n, D], in the unit fitted to the queries'
        mean q_d² [B, Hkv, D] (``query_moments``): the unit, the step and the codes are frozen from here on.
        row_lo [B]: row b's keys start there (a left-padded batch), or None."""
        self.q_sq = q_sq.float().cpu()
        B = keys.shape[0]
        self._fit(keys.float().cpu(), torch.zeros(B, dtype=torch.long) if row_lo is None else row_lo.cpu())
        self.sketch_store = self._new_sketch()
        self._index(keys)

    def _fit(self, kf: torch.Tensor, row_lo: torch.Tensor) -> None:
        """A rotated index's unit and step from host keys kf [B, Hkv, n, D] fp32, row b's from row_lo[b] on."""
        rot, units, scales = self.rot(), [], []
        for b in range(kf.shape[0]):
            kb, mu = kf[b:b + 1, :, int(row_lo[b]):], self.mu[b:b + 1]
            units.append(rotated_unit(rotated_std(kb, mu), self.q_sq[b:b + 1]))
            scales.append(rotated_sketch_scale(kb, mu, units[-1], rot))
        self.unit, self.sketch_scale = torch.cat(units), torch.cat(scales)

    def reference_sketch(self, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The torch definition of what the kernel scans for host keys [B, Hkv, n, D]: (codes, scale) of the
        sketch, (codes, scale, unit, rot) of the rotated one (``estimator_scores``' ``sketch``)."""
        if self.rotated:
            return rotated_sketch_codes(keys, self.mu, self.unit, self.rot(), self.sketch_scale), \
                self.sketch_scale, self.unit, self.rot()
        return sketch_codes(keys, self.mu, self.sketch_scale, self.sketch_bits), self.sketch_scale

    def query_rows(self, q: torch.Tensor) -> torch.Tensor:
        """The query rows the sketch scan takes (``sketch_rows``): q [B, Hkv, G, Tq, D] → same shape fp32."""
        return sketch_rows(q, self.sketch_scale, *((self.unit, self.rot()) if self.rotated else ()))

    def proj(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return projection(self.seed, self.site, self.num_kv_heads, self.head_dim, self.lsh_k, self.lsh_l,
                          str(device))

    def codes(self, k: torch.Tensor) -> torch.Tensor:
        """int32 [B, Hkv, n, L]: codes of keys k [B, Hkv, n, D] (centred by μ), on k's device."""
        return simhash(k, self.mu, self.proj(k.device), self.lsh_k)

    def query_codes(self, q: torch.Tensor) -> torch.Tensor:
        """int32 [B, H, Tq, L]: the SimHash of the raw query (no centring: cos θ is taken between q and
        k − μ)."""
        B, H, Tq, D = q.shape
        G = H // self.num_kv_heads
        qg = q.float().reshape(B, self.num_kv_heads, G * Tq, D)
        zero = torch.zeros(B, self.num_kv_heads, D, device=q.device)
        return simhash(qg, zero, self.proj(q.device), self.lsh_k).reshape(B, H, Tq, self.lsh_l)

    def add(self, k: torch.Tensor, host_keys) -> None:
        """Index the keys just appended to the host store: k [B, Hkv, T, D] (any device; hashed there).
        ``host_keys()`` returns every host key [B, Hkv, n, D]; it is called once, to build the index."""
        self.n_keys += k.shape[2]
        if self.built:
            keys = k
        elif self.n_keys >= self.min_keys:
            keys = k if k.shape[2] == self.n_keys else host_keys()
            self.mu = keys.float().mean(2).cpu()  # [B, Hkv, D]
            if self.rotated:
                return  # coded at the first step that attends (``code``)
            if self.sketch:
                self.sketch_scale = sketch_scale(keys.cpu(), self.mu, self.sketch_bits)
        else:
            return
        if self.coded:
            self._index(keys)

    def _index(self, keys: torch.Tensor) -> None:
        """Index keys [B, Hkv, n, D] (the next n offloaded ones) under the built μ: their sketch or codes."""
        if self.sketch:
            self._add_sketch(self.reference_sketch(keys.cpu())[0])
        else:
            self._add_codes(self.codes(keys).cpu())

    def _add_sketch(self, codes: torch.Tensor) -> None:
        """codes: int8 [B, Hkv, n, D] of the next n offloaded keys, into the sketch blocks: SKETCH_BLOCK keys
        each, as ``sketch_tiles`` lays them out."""
        tiles = sketch_tiles(codes, self.sketch_bits)  # [B, Hkv, n, words, 4], n a multiple of 16 or not
        self._put_tiles(tiles, self.n_keys - codes.shape[2])

    def _new_sketch(self) -> Blocks:
        return Blocks(SKETCH_BLOCK, 64, self.sketch_store.new)

    @property
    def sketch_blocks(self) -> list[torch.Tensor]:
        return self.sketch_store.tensors

    def _put_tiles(self, tiles: torch.Tensor, at: int) -> None:
        """Write the sketch bytes tiles [B, Hkv, n, words, 4] of keys [at, at + n)."""
        t, n = 0, tiles.shape[2]
        B, Hkv, _, words, _ = tiles.shape
        blocks = self.sketch_store
        while t < n:
            i, end = blocks.for_write(at)
            blk = blocks.tensors[i]
            off = at - blocks.starts[i]
            m = min(end - at, n - t)
            if off % 16 == 0 and m % 16 == 0:  # whole tiles: one strided copy
                blk[:, :, off // 16:(off + m) // 16] = tiles[:, :, t:t + m].reshape(B, Hkv, m // 16, 16, words, 4) \
                    .transpose(3, 4)
            else:
                for j in range(m):
                    if (off + j) % 16 == 0:
                        blk[:, :, (off + j) // 16] = 0
                    blk[:, :, (off + j) // 16, :, (off + j) % 16] = tiles[:, :, t + j]
            at, t = at + m, t + m

    def fork(self) -> LSHIndex:
        """An index of the same keys that shares this one's sealed parts: sketch blocks below the fork point
        (rounded down to 64 keys; the rest is copied into a block of the fork's own) and bucket segments;
        the small per-row parts (μ, scales, the unsealed tail) are copied."""
        child = copy.copy(self)
        for name in ("mu", "sketch_scale", "unit", "q_sq"):
            if getattr(self, name) is not None:
                setattr(child, name, getattr(self, name).clone())
        child.tail = self.tail.clone()
        child.seg_ids, child.seg_starts, child.seg_meta = list(self.seg_ids), list(self.seg_starts), list(self.seg_meta)
        self.segments_shared = child.segments_shared = bool(self.seg_ids)
        child.sketch_store, n0 = self.sketch_store.fork(self.n_keys)
        if self.sketch_blocks and self.n_keys > n0:  # the fork point's tiles, copied
            j = self.sketch_store.find(n0)
            t0 = (n0 - self.sketch_store.starts[j]) // 16
            m = -(-(self.n_keys - n0) // 16)
            child.sketch_blocks[-1][:, :, :m] = self.sketch_blocks[j][:, :, t0:t0 + m]
        return child

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(meta, tensors) of the index (``KVStore.state``): the sketch in regular blocks, one tensor
        [n_blocks, B, Hkv, tiles, words, 16, 4]; the bucket segments one tensor each."""
        meta = {"n_keys": self.n_keys, "tail_base": self.tail_base, "tail_len": self.tail_len,
                "q_rows": self.q_rows, "seg_meta": [list(m) for m in self.seg_meta]}
        tensors = {"tail": self.tail[..., :self.tail_len].contiguous()}
        for name in ("mu", "sketch_scale", "unit", "q_sq"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        for i, (ids, st) in enumerate(zip(self.seg_ids, self.seg_starts)):
            tensors[f"seg_ids.{i}"], tensors[f"seg_starts.{i}"] = ids, st
        if self.sketch_blocks:
            B, Hkv, tiles, words = self.sketch_blocks[0].shape[:4]
            n_blocks = -(-self.n_keys // SKETCH_BLOCK)
            flat = torch.zeros(B, Hkv, n_blocks * tiles, words, 16, 4, dtype=torch.int8)
            for i, blk in enumerate(self.sketch_blocks):
                start = self.sketch_store.starts[i]
                t0, t1 = start // 16, -(-(start + self.sketch_store.count(i, self.n_keys)) // 16)
                if t1 > t0:
                    flat[:, :, t0:t1] = blk[:, :, :t1 - t0]
            tensors["sketch"] = flat.view(B, Hkv, n_blocks, tiles, words, 16, 4).permute(2, 0, 1, 3, 4, 5, 6).contiguous()
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor], batch: int, num_kv_heads: int, head_dim: int,
                   options: Options, *, site: str = "") -> LSHIndex:
        """The index ``state`` described; the sketch blocks are views of tensors["sketch"] (not copied)."""
        idx = cls(batch, num_kv_heads, head_dim, options, site=site)
        idx.n_keys, idx.tail_base, idx.tail_len = meta["n_keys"], meta["tail_base"], meta["tail_len"]
        idx.seg_meta = [tuple(m) for m in meta["seg_meta"]]
        idx.mu, idx.sketch_scale = tensors.get("mu"), tensors.get("sketch_scale")
        idx.unit, idx.q_sq, idx.q_rows = tensors.get("unit"), tensors.get("q_sq"), meta.get("q_rows", 0)
        idx.tail = tensors["tail"].clone()  # written in place as keys come: never the file's
        idx.seg_ids = [tensors[f"seg_ids.{i}"] for i in range(len(idx.seg_meta))]
        idx.seg_starts = [tensors[f"seg_starts.{i}"] for i in range(len(idx.seg_meta))]
        if "sketch" in tensors:
            idx.sketch_store = Blocks.regular(list(tensors["sketch"].unbind(0)), SKETCH_BLOCK, 64, idx.sketch_store.new)
        return idx

    def kernel_sketch_starts(self) -> torch.Tensor | None:
        """The sketch blocks' starts for the kernel (``lsh_attention``'s sketch_starts): None when block i
        starts at i · SKETCH_BLOCK (an index that was never forked)."""
        return self.sketch_store.kernel_starts()

    def held_bytes(self) -> dict[int, int]:
        """Bytes the index holds, per tensor by its address (``runtime_stats`` counts what forks share
        once): bucket tables, tail codes, μ and scales whole; of a sketch block, the tiles of its keys."""
        held = {t.data_ptr(): t.nbytes for t in [self.mu, self.sketch_scale, self.unit, self.q_sq, self.tail,
                                                 *self.seg_ids, *self.seg_starts]
                if t is not None and t.nbytes}
        for i, blk in enumerate(self.sketch_blocks):
            tiles = -(-self.sketch_store.count(i, self.n_keys) // 16)
            held[blk.data_ptr()] = tiles * blk[0, 0, 0].nbytes * self.batch * self.num_kv_heads
        return held

    def _add_codes(self, codes: torch.Tensor) -> None:
        """codes: int32 [B, Hkv, n, L] of the next n offloaded keys.  Whenever the tail and the new keys
        reach ``seal_size`` together (``bulk_seal`` when the new keys alone are that many), they are sealed
        as one segment as large as possible (up to MAX_SEGMENT): bulk appends (prefill, chunked prefill)
        make few large segments, whose ids pack tighter; token-by-token decode seals every ``seal_size``
        tokens."""
        t, n = 0, codes.shape[2]
        seal_at = self.bulk_seal if n >= self.bulk_seal else self.seal_size
        while t < n:
            if self.tail_len + (n - t) >= seal_at:
                m = min(n - t, MAX_SEGMENT - self.tail_len)
                tail = self.tail[..., :self.tail_len].permute(0, 1, 3, 2).int() & 0xFFFF
                self._seal(torch.cat([tail, codes[:, :, t:t + m]], 2))
                self.tail_len = 0
                self.tail = self.tail[..., :0]  # sealed: the tail's memory goes back
                t += m
                continue
            m = n - t  # the rest fits the tail
            need = self.tail_len + m
            if need > self.tail.shape[3]:  # grow by a quarter (bytes are counted as allocated: doubling
                # would leave up to half of a 4096-token tail unused); amortised O(1) per key
                cap = min(self.seal_size, max(256, self.tail.shape[3] + self.tail.shape[3] // 4, need))
                grown = torch.zeros(*self.tail.shape[:3], cap, dtype=torch.int16)
                grown[..., :self.tail_len] = self.tail[..., :self.tail_len]
                self.tail = grown
            self.tail[..., self.tail_len:need] = codes[:, :, t:].permute(0, 1, 3, 2).to(torch.int16)
            self.tail_len = need
            t = n

    def _seal(self, codes: torch.Tensor) -> None:
        ids, starts = lsh_build_segment(codes.contiguous(), self.lsh_k)
        base = self.tail_base  # the segments cover [0, tail_base); the sealed codes start there
        self.seg_ids.append(ids)
        self.seg_starts.append(starts)
        self.seg_meta.append((base, codes.shape[2]))
        self.tail_base = base + codes.shape[2]
        # binary-counter merging: two equal neighbours become one (decode seals seal_size tokens at a
        # time; merged, they pack tighter — 4096 → 8192 → ... → 32768 — and retrieval visits fewer
        # segments).  Each token is merged O(log) times.
        while (len(self.seg_meta) >= 2 and self.seg_meta[-1][1] == self.seg_meta[-2][1]
               and 2 * self.seg_meta[-1][1] <= MAX_SEGMENT):
            (b0, n0), (_, n1) = self.seg_meta[-2], self.seg_meta[-1]
            ids, starts = lsh_merge_segments(self.seg_ids[-2], self.seg_starts[-2], n0, self.seg_ids[-1],
                                             self.seg_starts[-1], n1)
            del self.seg_ids[-2:], self.seg_starts[-2:], self.seg_meta[-2:]
            self.seg_ids.append(ids)
            self.seg_starts.append(starts)
            self.seg_meta.append((b0, n0 + n1))

    def recentre(self, keys: torch.Tensor, row_lo: torch.Tensor) -> None:
        """Rebuild the index with each batch row's μ (and sketch scale) taken over its own keys only —
        keys [B, Hkv, n, D], every key indexed so far; row b's start at row_lo[b] (a left-padded batch:
        the padding's keys would otherwise pull μ towards themselves and skew the row's retrieval).  Every
        key is re-indexed (the padding's too: the kernel skips them)."""
        B, n = keys.shape[0], keys.shape[2]
        lo = row_lo.cpu().clamp(0, max(n - 1, 0))
        kf = keys.float().cpu()
        self.mu = torch.cat([kf[b:b + 1, :, int(lo[b]):].mean(2) for b in range(B)])  # as ``add`` builds it
        if self.rotated and self.unit is not None:  # refitted to the same queries
            self._fit(kf, lo)
        elif self.sketch and not self.rotated:
            self.sketch_scale = torch.cat([sketch_scale(kf[b:b + 1, :, int(lo[b]):], self.mu[b:b + 1], self.sketch_bits)
                                           for b in range(B)])
        self.seg_ids, self.seg_starts, self.seg_meta = [], [], []
        self.sketch_store, self.segments_shared = self._new_sketch(), False
        self.tail = self.tail[..., :0]
        self.tail_base = self.tail_len = 0
        self.n_keys = n
        if self.coded:
            self._index(keys)

    def take_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Batch rows dst become copies of rows src: every per-row tensor of the index (see
        ``KVStore.reorder``).  The projection is per site, shared by every row.  What a fork may share is
        copied first (copy on write)."""
        for i in range(len(self.sketch_store)):
            self.sketch_store.writable(i)
        if self.segments_shared:
            self.seg_ids, self.seg_starts = [t.clone() for t in self.seg_ids], [t.clone() for t in self.seg_starts]
            self.segments_shared = False
        for t in [self.mu, self.sketch_scale, self.unit, self.q_sq, self.tail, *self.sketch_blocks, *self.seg_ids,
                  *self.seg_starts]:
            take_rows(t, dst, src)

    def truncate(self, n: int) -> None:
        """Forget every key from the n-th offloaded one on (``KVStore.crop``).  The sketch and the unsealed
        tail are indexed by position (codes past n are never read: the kernel scans n_keys); keys already
        sealed into a bucket segment cannot be taken out of it."""
        if n >= self.n_keys:
            return
        if self.built and not self.sketch:
            if n < self.tail_base:
                raise ValueError(f"the LSH index sealed keys {self.tail_base - n} and more before the crop point "
                                 f"into a bucket segment, which cannot be undone")
            self.tail_len = n - self.tail_base
        self.n_keys = n

    @property
    def index_bytes(self) -> int:
        """Bytes of the index proper: bucket tables, tail codes, μ, the sketch's filled tiles (the
        projection is per site, shared by all sequences, and reported apart)."""
        return sum(self.held_bytes().values())

    @property
    def projection_bytes(self) -> int:
        return self.num_kv_heads * self.head_dim * self.lsh_k * self.lsh_l * 2
