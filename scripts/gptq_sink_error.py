"""GPTQ's output error at the first position of each window (the attention-sink token) against the rest.

For the attention input (q/k/v share it) and down_proj of every block of the float model, this splits the
input Hessian into the first position of each calibration window (H_first) and all other positions
(H_rest), quantizes with RTN and with GPTQ (from H_first + H_rest, and from H_rest alone), and prints
the output error tr(D H D^T) of each on H_rest and on H_first. Writes the rows as JSON.

    python scripts/gptq_sink_error.py --out docs/results/diag/gptq_sink_error_smollm2_int4_g128.json
"""
import argparse
import json

import torch

import lowbit
from lowbit.models.arch import arch_for, get_module
from lowbit.data.calib import sample_windows
from lowbit.formats.quantize import quantize_rtn
from lowbit.formats.registry import make_format
from lowbit.methods.gptq import gptq_quantize
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--nsamples", type=int, default=32)
ap.add_argument("--out", required=True)
args = ap.parse_args()
model, tok = lowbit.load_model(args.model)
arch = arch_for(model)
ids = sample_windows(tok, "wiki-train", args.nsamples, 512, seed=0)
blocks = get_module(model, arch.blocks)
names = [arch.groups[0].linears[0], arch.groups[-1].linears[0]]   # the attention input and down_proj
acc = {}
hooks = []
for i, b in enumerate(blocks):
    for n in names:
        def hook(mod, args, key=(i, n)):
            x = args[0][0].float()                      # (T, in)
            h0 = x[:1].T @ x[:1]; hr = x[1:].T @ x[1:]
            a = acc.setdefault(key, [0, 0])
            a[0] = a[0] + h0; a[1] = a[1] + hr
        hooks.append(get_module(b, n).register_forward_pre_hook(hook))
with torch.no_grad():
    for r in ids:
        model.model(input_ids=r.unsqueeze(0), use_cache=False)
fmt = make_format({"format": "int", "bits": 4, "group_size": 128, "sym": False})
def err(W, Q, H):
    D = W - Q
    return float(torch.einsum("oi,ij,oj->", D, H, D))
out = []
for (i, n), (h0, hr) in sorted(acc.items()):
    H = h0 + hr
    W = get_module(blocks[i], n).weight.detach().float()
    share0 = float(torch.trace(h0) / torch.trace(H))
    Qr = quantize_rtn(W, fmt).dequantize(); Qg = gptq_quantize(W, H, fmt).dequantize(); Qs = gptq_quantize(W, hr, fmt).dequantize()
    row = dict(layer=i, name=n, first_token_share_of_trH=round(share0, 3),
               rest_rtn=err(W, Qr, hr), rest_gptq_all=err(W, Qg, hr), rest_gptq_rest=err(W, Qs, hr),
               first_rtn=err(W, Qr, h0), first_gptq_all=err(W, Qg, h0), first_gptq_rest=err(W, Qs, h0))
    out.append(row)
    print(i, n, "share0 %.3f" % share0, "rest: rtn %.3g gptq(H_all) %.3g gptq(H_rest) %.3g" % (row["rest_rtn"], row["rest_gptq_all"], row["rest_gptq_rest"]),
          "| first: rtn %.3g gptq(H_all) %.3g gptq(H_rest) %.3g" % (row["first_rtn"], row["first_gptq_all"], row["first_gptq_rest"]), flush=True)
with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
