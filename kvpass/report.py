"""What the pass did to each attention site, for users (``kvpass.explain``) and for logs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SiteReport:
    name: str              # module path of the attention, e.g. "model.layers.7.self_attn"
    layer: int | None      # layer index parsed from the name, if any
    phase: str             # "decode" (split), "prefill" (dense + offload), or "-" (left alone)
    rewritten: bool        # kvpass handles this site (split attention, or dense prefill that fills the store)
    reason: str            # what was done, or why the site stays dense
    cache: str = "-"       # "growing" (torch.cat), "static" (index_copy_/setitem), or "none"


@dataclass
class Report:
    graphs: int = 0
    sites: list[SiteReport] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    def __str__(self) -> str:
        head = f"kvpass: {self.rewritten}/{len(self.sites)} attention sites rewritten in {self.graphs} graph(s)"
        if not self.sites:
            return head + " (no scaled_dot_product_attention found)"
        w = max(len(s.name) for s in self.sites)
        rows = [head, f"  {'site':<{w}}  {'cache':<8} {'phase':<8} {'rewritten':<9} reason"]
        for s in self.sites:
            rows.append(f"  {s.name:<{w}}  {s.cache:<8} {s.phase:<8} {'yes' if s.rewritten else 'no':<9} {s.reason}")
        return "\n".join(rows)

    __repr__ = __str__
