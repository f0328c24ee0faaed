"""SimHash index over the offloaded keys of one store, and the plain-torch reference of the estimators.

Shapes: B batch, Hkv kv heads, D head_dim, K = lsh_k bits per table, L = lsh_l tables.

code_l(x) = Σ_j [ (x − μ)·R[:, lK + j] > 0 ] << j      (K bits, table l; R: [D, K·L] per kv head)
Keys are centred by μ, the mean of the first ``min_keys``+ offloaded keys, frozen when the index is
built (a moving μ would silently invalidate every stored code).  Until then no index exists and the
estimators read every offloaded key (there are fewer than ``min_keys``).

Layout: sealed segments (C++ bucket tables, ids bit-packed, see ``cpu_ops/csrc/lsh_attention.cpp``)
cover keys [0, tail_base); the newest keys [tail_base, tail_base + tail_len) keep their codes in a
small tail (scanned by the kernel) until ``seal_size`` of them are sealed into a segment.  The prompt's
keys are sealed in bulk, up to 32768 per segment (15-bit ids).
"""

from __future__ import annotations

import functools
import zlib

import torch
from kvpass.cpu_ops import log_retrieval_probability, lsh_build_segment, lsh_merge_segments, sign_codes

MAX_SEGMENT = 32768


@functools.lru_cache(maxsize=256)
def projection(seed: int, site: str, num_kv_heads: int, head_dim: int, lsh_k: int, lsh_l: int,
               device: str) -> torch.Tensor:
    """The SimHash projection of one site: [Hkv, D, K·L] bf16, Gaussian, from a generator seeded by
    (seed, site) — the same for every sequence through that site, shared between them.  Stored in
    bf16 (the CPU kernel streams it for every decode step; bf16 halves that) and used as exactly these
    values everywhere — keys are hashed with its fp32 upcast — so queries and keys share one R."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(site.encode())) % (2**63))
    return torch.randn(num_kv_heads, head_dim, lsh_k * lsh_l, generator=gen).to(device, torch.bfloat16)


def hash_codes(x: torch.Tensor, proj: torch.Tensor, lsh_k: int) -> torch.Tensor:
    """SimHash of already-centred fp32 x [B, Hkv, n, D] with proj [Hkv, D, K·L] fp32 → int32 [B, Hkv, n, L].
    One GEMM; written with exportable ops only (powers of two, not shifts), so the exported decode step
    hashes with this same function."""
    return pack_bits(x @ proj[None], lsh_k)


def pack_bits(y: torch.Tensor, lsh_k: int) -> torch.Tensor:
    """int32 [B, Hkv, n, L] codes from projections y [B, Hkv, n, K·L]: bit j of code l = [y[..., lK + j] > 0]."""
    B, Hkv, n = y.shape[:3]
    weights = torch.pow(2, torch.arange(lsh_k, device=y.device, dtype=torch.int32))
    return ((y > 0).reshape(B, Hkv, n, -1, lsh_k).to(torch.int32) * weights).sum(-1).to(torch.int32)


def simhash(x: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, lsh_k: int, chunk: int = 4096) -> torch.Tensor:
    """Codes of x: [B, Hkv, n, D] (any float dtype, any device) → int32 [B, Hkv, n, L], on x's device.

    mu: [B, Hkv, D] fp32; proj: [Hkv, D, K·L] (bf16 values, computed in fp32).  In token chunks (a GEMM
    each).  On the CPU the bits are packed by the C++ ``sign_codes`` (one pass; the torch packing's
    temporaries cost more than the GEMM there); elsewhere by ``pack_bits`` — the same codes."""
    B, Hkv, n, _ = x.shape
    proj = proj.to(x.device, torch.float32)
    pack = sign_codes if x.device.type == "cpu" else pack_bits
    out = [pack((x[:, :, t0:t0 + chunk].float() - mu.to(x.device)[:, :, None]) @ proj[None], lsh_k)
           for t0 in range(0, n, chunk)]
    return torch.cat(out, 2) if out else torch.empty(B, Hkv, 0, proj.shape[-1] // lsh_k, dtype=torch.int32,
                                                    device=x.device)


class LSHIndex:
    """The SimHash index of one store (one sequence batch at one attention site)."""

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, lsh_k: int = 10, lsh_l: int = 150,
                 threshold: int = 2, seed: int = 0, site: str = "", min_keys: int = 256, seal_size: int = 4096):
        if not 1 <= lsh_k <= 16:
            raise ValueError(f"kvpass: lsh_k must be in [1, 16], got {lsh_k}")
        if not 1 <= threshold <= min(lsh_l, 255):
            raise ValueError(f"kvpass: lsh_threshold must be in [1, min(lsh_l={lsh_l}, 255)], got {threshold}")
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.lsh_k, self.lsh_l, self.threshold, self.seed, self.site = lsh_k, lsh_l, threshold, seed, site
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
        self.n_keys = 0  # keys offloaded so far (all indexed once the index is built)

    @property
    def built(self) -> bool:
        return self.mu is not None

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
            self._add_codes(self.codes(k).cpu())
        elif self.n_keys >= self.min_keys:
            keys = k if k.shape[2] == self.n_keys else host_keys()
            self.mu = keys.float().mean(2).cpu()  # [B, Hkv, D]
            self._add_codes(self.codes(keys).cpu())

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

    @property
    def index_bytes(self) -> int:
        """Bytes of the index proper: bucket tables, tail codes, μ (the projection is per site, shared
        by all sequences, and reported apart)."""
        n = sum(t.nbytes for t in self.seg_ids) + sum(t.nbytes for t in self.seg_starts) + self.tail.nbytes
        return n + (self.mu.nbytes if self.mu is not None else 0)

    @property
    def projection_bytes(self) -> int:
        return self.num_kv_heads * self.head_dim * self.lsh_k * self.lsh_l * 2


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, estimator: str, *,
                        q_codes: torch.Tensor | None = None, k_codes: torch.Tensor | None = None,
                        mu: torch.Tensor | None = None, lsh_k: int = 10, lsh_l: int = 150, threshold: int = 2,
                        budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch definition of the estimators over offloaded keys (dense cost, same result).

    q: [B, H, Tq, D]; k, v: [B, Hkv, n, D]; q_codes: [B, H, Tq, L], k_codes: [B, Hkv, n, L]; mu: [B, Hkv, D].
    "sample": keys colliding in >= threshold tables, score s − log P(retrieved | cos θ(q, k − μ));
    "topk": the ``budget`` best exact scores among those; "oracle": the ``budget`` best of all keys;
    "exact": all keys.  Returns out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32, n_read [B, H, Tq] int32.
    """
    B, H, Tq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.float().reshape(B, Hkv, G, Tq, D)
    kf, vf = k.float(), v.float()
    s = torch.einsum("bhgtd,bhnd->bhgtn", qf, kf) * scale  # [B, Hkv, G, Tq, n]
    if estimator in ("sample", "topk"):
        qc = q_codes.reshape(B, Hkv, G, Tq, 1, -1)
        coll = (qc == k_codes[:, :, None, None]).sum(-1)  # [B, Hkv, G, Tq, n]
        keep = coll >= threshold
    else:
        keep = torch.ones_like(s, dtype=torch.bool)
    n_read = keep.sum(-1)
    if estimator == "sample":
        kc = kf - mu[:, :, None]
        cos = torch.einsum("bhgtd,bhnd->bhgtn", qf, kc) / (
            qf.norm(dim=-1, keepdim=True) * kc.norm(dim=-1)[:, :, None, None]).clamp_min(1e-30)
        logp = log_retrieval_probability(cos.double().clamp(-1, 1).flatten(), lsh_k, lsh_l, threshold)
        s = s - logp.view(cos.shape).float()
    elif estimator in ("topk", "oracle") and budget is not None and budget < n:
        masked = s.masked_fill(~keep, float("-inf"))
        top = masked.topk(max(budget, 0), dim=-1).indices
        sel = torch.zeros_like(keep).scatter_(-1, top, True)
        keep = keep & sel
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("bhgtn,bhnd->bhgtd", p, vf)
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq), n_read.reshape(B, H, Tq).int()
