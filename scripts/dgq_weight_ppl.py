"""Where DGQ's perplexity goes: its weights with float activations against fine-grained RTN, and the int8 path.

    python scripts/dgq_weight_ppl.py smollm2-135m --windows 10

Every block linear of the float model is replaced by (RTN codes, no calibration, v2 ``wiki``, 512-token windows):
fine-grained symmetric int4 g128 (A16), DGQ's dual-grained weights with and without the phase-2 channel-scale
search (A16, float weights ``c * k * s``), and the DGQ layer itself (int8 per-token activations, int8 GEMM).
Prints one perplexity per case; nothing is written.
"""
from __future__ import annotations

import argparse
import copy

import torch

from lowbit.api import load_model
from lowbit.eval.ppl import evaluate_ppl
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.formats.dual_grained import SCALE_SEARCH_ALPHAS, fit_dual_grained
from lowbit.models.arch import arch_for, get_module, set_module
from lowbit.nn.dgq import from_dual_grained


def _replaced(model, arch, fn):
    """A copy of ``model`` whose block linears are ``fn(weight)``: a float weight, or a module to swap in."""
    m = copy.deepcopy(model)
    for i, blk in enumerate(get_module(m, arch.blocks)):
        for name in arch.linears:
            lin = get_module(blk, name)
            out = fn(lin.weight.detach().float())
            if isinstance(out, torch.nn.Module):
                set_module(m, f"{arch.blocks}.{i}.{name}", out)
            else:
                lin.weight.data = out.to(lin.weight.dtype)
    return m


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    model, tok = load_model(args.model)
    arch, g = arch_for(model), args.group_size
    cases = {
        f"fine int4 sym g{g} RTN, float activations": lambda w: quantize_rtn(w, IntFormat(4, g, sym=True)).dequantize(),
        "DGQ weights, float activations": lambda w: fit_dual_grained(w, g).dequantize(),
        "DGQ weights with --dgq-scale-search, float activations":
            lambda w: fit_dual_grained(w, g, alphas=SCALE_SEARCH_ALPHAS).dequantize(),
        "DGQ layer (int8 per-token activations, int8 GEMM)": lambda w: from_dual_grained(fit_dual_grained(w, g)),
    }
    with torch.no_grad():
        for name, fn in cases.items():
            ppl, _ = evaluate_ppl(_replaced(model, arch, fn), tok, "wiki", 512, args.windows, progress=False)
            print(f"{name}: {ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
