"""GPTQ's output error at the first position of each window (the attention-sink token) against the rest.

For the attention input (q/k/v share it) and down_proj of every block of the float model, this splits the
input Hessian into the first position of each calibration window (H_first) and all other positions
(H_rest), quantizes with RTN and with GPTQ (from H_first + H_rest, and from H_rest alone), and prints
the output error tr(D H D^T) of each on H_rest and on H_first. Writes the rows as JSON.

    python scripts/gptq_sink_error.py --out docs/results/diag/gptq_sink_error_smollm2_int4_g128.json
"""
from __future__ import annotations

import argparse
import json

import torch

import lowbit
from lowbit.data.calib import sample_windows
from lowbit.formats.quantize import quantize_rtn
from lowbit.formats.registry import make_format
from lowbit.methods.gptq import gptq_quantize
from lowbit.models.arch import arch_for, get_module
from lowbit.utils import atomic_write_text


def split_hessians(model, paths: list[str], windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{linear path: (H_first, H_rest)}``: X^T X summed over the first position of each window, and over the
    others. The decoder alone runs (``get_decoder``): the LM head's logits are not needed."""
    acc: dict[str, list] = {p: [0, 0] for p in paths}

    def hook(mod, args, path):
        x = args[0][0].float()                       # (T, in): one window per forward
        acc[path][0] = acc[path][0] + x[:1].T @ x[:1]
        acc[path][1] = acc[path][1] + x[1:].T @ x[1:]

    hooks = [get_module(model, p).register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)) for p in paths]
    with torch.inference_mode():
        for row in windows:
            model.get_decoder()(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {p: (a[0], a[1]) for p, a in acc.items()}


def out_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T)."""
    D = W - Q
    return float(torch.einsum("oi,ij,oj->", D, H, D))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = lowbit.load_model(args.model)
    arch = arch_for(model)
    ids = sample_windows(tok, "wiki-train", args.nsamples, 512, seed=0)
    n_blocks = len(get_module(model, arch.blocks))
    names = [arch.groups[0].linears[0], arch.groups[-1].linears[0]]   # the attention input and down_proj
    paths = [f"{arch.blocks}.{i}.{n}" for i in range(n_blocks) for n in names]
    fmt = make_format({"format": "int", "bits": 4, "group_size": 128, "sym": False})
    out = []
    for path, (h0, hr) in split_hessians(model, paths, ids).items():
        H = h0 + hr
        W = get_module(model, path).weight.detach().float()
        share0 = float(torch.trace(h0) / torch.trace(H))
        Qs = {"rtn": quantize_rtn(W, fmt).dequantize(), "gptq_all": gptq_quantize(W, H, fmt).dequantize(),
              "gptq_rest": gptq_quantize(W, hr, fmt).dequantize()}
        i, name = path[len(arch.blocks) + 1:].split(".", 1)
        row = {"layer": int(i), "name": name, "first_token_share_of_trH": round(share0, 3),
               **{f"rest_{k}": out_err(W, Q, hr) for k, Q in Qs.items()},
               **{f"first_{k}": out_err(W, Q, h0) for k, Q in Qs.items()}}
        out.append(row)
        print(i, name, f"share0 {share0:.3f}",
              "rest: " + " ".join(f"{k} {row['rest_' + k]:.3g}" for k in Qs),
              "| first: " + " ".join(f"{k} {row['first_' + k]:.3g}" for k in Qs), flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
