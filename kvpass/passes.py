"""The FX pass: find every attention site of a Dynamo graph (``kvpass.sites``, the one matcher), rewrite it,
report what was done.

rewrite — decode: append_kv → split_attention (static part + CPU part + LSE merge), and the model's
          cache receives placeholders; prefill: the model's SDPA stays, the prompt's KV is offloaded.
"""

from __future__ import annotations

from torch import fx

from kvpass import ops
from kvpass.report import Report
from kvpass.runtime import Options
from kvpass.sites import Site, UnsupportedSite, analyse, fuse_decomposed_attention

__all__ = ["UnsupportedSite", "rewrite", "run_pass"]


# ---------------------------------------------------------------- rewrite

def rewrite(gm: fx.GraphModule, sites: list[Site], opts: Options) -> None:
    g = gm.graph
    cfg = opts.to_op_string()
    threads = opts.cpu_threads or 0
    for site in sites:
        if not site.offload:
            continue
        k, v, name = site.k, site.v, site.report.name
        # a prefill hands a rotated index its queries, to fit its code to (the model's SDPA attends them)
        queries = site.q if site.report.phase == "prefill" and opts.index == "rotated" else None
        with g.inserting_before(site.sdpa):
            if k.kind == "growing":
                handle = g.call_function(ops.append_growing, (k.past, v.past, k.new, v.new, name, cfg, queries))
                for upd in (k, v):
                    ph = g.call_function(ops.placeholder, (handle, upd.past, upd.new))
                    chain = site.chains[0] if upd is k else site.chains[1]
                    upd.node.replace_all_uses_with(ph, delete_user_cb=lambda u, c=chain, s=site.sdpa: u not in c
                                                   and u is not s)
            else:
                handle = g.call_function(ops.append_static, (k.past, v.past, k.new, v.new, k.positions, name, cfg,
                                                             queries))
            if site.report.phase == "decode":
                out = g.call_function(ops.split_attention,
                                      (site.q, handle, site.mask, site.scale, opts.estimator, threads, name,
                                       site.softcap))
        if site.report.phase == "decode":
            site.sdpa.replace_all_uses_with(out)
            dead = [site.sdpa, *site.chains[0], *site.chains[1]]
            if k.kind == "growing":
                dead += [k.node, v.node]
            for n in dead:  # in program order: each is dead once its consumers are gone
                if not n.users:
                    g.erase_node(n)
    g.lint()
    gm.recompile()


def run_pass(gm: fx.GraphModule, opts: Options, needs_grad: bool = False) -> Report:
    # eager softmax(q·kᵀ)·v → SDPA first (inference graphs only: a training graph is left exactly as it is)
    unmatched = [] if needs_grad else fuse_decomposed_attention(gm)
    sites = analyse(gm, opts)
    if needs_grad:  # kvpass's ops have no backward; training graphs stay exactly as they are
        for s in sites:
            if s.placeholder_past:
                raise UnsupportedSite(f"kvpass: attention site {s.index} ({s.report.name}) needs gradients, "
                                      f"but its KV lives in kvpass's store; decode under torch.no_grad().")
            s.offload = s.report.rewritten = False
            s.report.reason = "autograd is on (call under torch.no_grad() / inference_mode to decode with kvpass)"
    report = Report(graphs=1, sites=[s.report for s in sites], unmatched=unmatched)
    if opts.on_unmatched == "error":
        bad = [s for s in sites if not s.report.rewritten and s.report.reason != "listed in dense_layers"]
        if bad:
            s = bad[0]
            raise UnsupportedSite(f"kvpass: attention site {s.index} ({s.report.name}) cannot be rewritten: "
                                  f"{s.report.reason}. (on_unmatched='error'; pass on_unmatched='fallback' "
                                  f"to keep it dense.)")
    if not opts.dryrun:
        rewrite(gm, sites, opts)
    return report
