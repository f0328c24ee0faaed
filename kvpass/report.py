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
    unmatched: list[str] = field(default_factory=list)  # attention-like code left alone, and why

    def advice(self) -> str | None:
        """One line for a graph whose attention kvpass leaves entirely to the model, else None."""
        if self.rewritten:
            return None
        if self.sites:
            reasons = sorted({s.reason for s in self.sites})
            return (f"kvpass: none of the {len(self.sites)} attention sites was rewritten ({'; '.join(reasons)}); "
                    f"the model runs dense. kvpass.explain(...) lists each site.")
        if self.unmatched:
            return (f"kvpass: no attention was rewritten: {self.unmatched[0]}"
                    f"{f' (and {len(self.unmatched) - 1} more)' if len(self.unmatched) > 1 else ''}; the model "
                    f"runs dense.")
        return None

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    def __str__(self) -> str:
        head = f"kvpass: {self.rewritten}/{len(self.sites)} attention sites rewritten in {self.graphs} graph(s)"
        if not self.sites:
            return head + " (no attention found)" + "".join(f"\n  {u}" for u in self.unmatched)
        w = max(len(s.name) for s in self.sites)
        rows = [head, f"  {'site':<{w}}  {'cache':<8} {'phase':<8} {'rewritten':<9} reason"]
        for s in self.sites:
            rows.append(f"  {s.name:<{w}}  {s.cache:<8} {s.phase:<8} {'yes' if s.rewritten else 'no':<9} {s.reason}")
        rows += [f"  {u}" for u in self.unmatched]
        return "\n".join(rows)

    __repr__ = __str__
