"""Layer output error of E8P against int2 and VPTQ in the same second-order loop, on a model's real Hessians.

The float model (optionally rotated, ``--rotate``) runs ``--nsamples`` calibration windows; the inputs of every linear
in the first ``--blocks`` blocks give ``H = 2 X^T X / n`` (float weights upstream, no quantized blocks). Each linear
is then quantized alone by GPTQ with each format and by VPTQ at a preset, and the relative output error
``tr(dW H dW^T) / tr(W H W^T)`` is printed per layer with the bits per weight of its stored buffers. A quick proxy
for a whole ``lowbit run``, which takes hours on a shared 2-core CPU.

    python scripts/e8p_layer_error.py smollm2-135m --rotate --blocks 0 15 29 --nsamples 16
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lowbit.api import load_model
from lowbit.calib.rotate import rotate_model
from lowbit.config import parse_format_tag
from lowbit.data.calib import sample_windows
from lowbit.formats import group_layout
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.vptq import VPTQConfig, vptq_quantize, layer_config, vq_layer_bits
from lowbit.models.arch import arch_for, get_module


def hessians(model, arch, ids, blocks):
    """``{(block, linear): H}`` from forward hooks on the float model."""
    acc, hooks = {}, []
    for b in blocks:
        blk = get_module(model, arch.blocks)[b]
        for name in arch.linears:
            lin = get_module(blk, name)

            def hook(mod, inp, out, key=(b, name)):
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
                h, n = acc.get(key, (0, 0))
                acc[key] = (h + 2 * x.T @ x, n + x.shape[0])
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i : i + 1])
    for h in hooks:
        h.remove()
    return {k: h / n for k, (h, n) in acc.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rotate", action="store_true")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=["e8p2-sym-pc", "int2-g64", "e8p3-sym-pc", "e8p4-sym-pc"])
    ap.add_argument("--vptq", type=float, nargs="*", default=[2.0])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    arch = arch_for(model)
    if a.rotate:
        rotate_model(model)
    ids = sample_windows(tok, "wiki-train", a.nsamples, 512, 0)
    H = hessians(model, arch, ids, a.blocks)
    rows = []
    for (b, name), h in sorted(H.items()):
        w = get_module(get_module(model, arch.blocks)[b], name).weight.detach().float()
        ref = float(torch.trace(w @ h @ w.T))

        def err(wq):
            d = wq - w
            return float(torch.trace(d @ h @ d.T)) / ref
        row = {"block": b, "linear": name, "shape": list(w.shape)}
        for tag in a.formats:
            fmt = parse_format_tag(tag).make()
            t = time.time()
            qw = gptq_quantize(w, h, fmt)
            lay = group_layout(w.shape[1], fmt.group_size)
            bits = fmt.bits + 16 * len(fmt.param_specs()) * lay.n_groups / w.shape[1]
            if tag.startswith("int") and "sym" not in tag:
                bits = fmt.bits + (16 + fmt.bits) * lay.n_groups / w.shape[1]
            row[tag] = {"err": err(qw.dequantize()), "bpw": bits, "s": round(time.time() - t, 1)}
        for p in a.vptq:
            cfg = layer_config(VPTQConfig(vptq_preset=p), *w.shape)
            t = time.time()
            qw = vptq_quantize(w, h, cfg)
            row[f"vptq{p}"] = {"err": err(qw.dequantize()), "bpw": vq_layer_bits(cfg, *w.shape) / w.numel(),
                               "s": round(time.time() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
