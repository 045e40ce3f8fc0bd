"""Why is GPTQ worse than RTN on a model? Per-layer output error on calibration and on evaluation tokens.

For every decoder linear of the float model this collects two input Hessians in one pass each:
``H_cal`` from the calibration windows (the ones ``lowbit run`` uses) and ``H_eval`` from the
perplexity windows. Each weight is quantized with RTN and with GPTQ (from ``H_cal``; with and without
act-order; at the given damping values) and, as a check of the solver, with a plain textbook GPTQ
written here without lazy batches. The relative output error of a quantized weight Q on data X is

    err(Q; H) = tr((W - Q) H (W - Q)^T) / tr(W H W^T),    H = 2 X^T X / n (as the engine accumulates it)

A solver that lowers err on H_cal but raises it on H_eval is fitting its calibration set; one that
raises err on H_cal has a bug. Writes a JSON (per-layer rows and sums) and prints a summary.

    python scripts/gptq_vs_rtn.py smollm2-135m --bits 4 --group-size 128 --out docs/results/diag/gptq_vs_rtn_smollm2_int4_g128.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit.calib.engine import GroupStats
from lowbit.data.calib import sample_windows
from lowbit.data.texts import load_text
from lowbit.eval.ppl import PROTOCOL_VERSION, make_windows
from lowbit.formats.quantize import quantize_rtn
from lowbit.formats.registry import make_format
from lowbit.methods.feedback import inverse_hessian_factor
from lowbit.methods.gptq import gptq_quantize
from lowbit.models.arch import arch_for, get_module
from lowbit.utils import atomic_write_text

HESSIAN = frozenset({"hessian"})


def collect_hessians(model, arch, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{linear path: H}`` over ``windows`` ``(n, T)`` of the float model, H accumulated as the calibration
    engine does (:class:`GroupStats`, 2 X^T X / n); linears sharing an input share one tensor."""
    blocks = get_module(model, arch.blocks)
    stats = {(i, g): GroupStats() for i in range(len(blocks)) for g in arch.groups}
    hooks = [get_module(blocks[i], g.linears[0]).register_forward_pre_hook(
                 lambda mod, args, s=s: s.add(args[0], HESSIAN)) for (i, g), s in stats.items()]
    with torch.inference_mode():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {f"{arch.blocks}.{i}.{name}": s.hessian for (i, g), s in stats.items() for name in g.linears}


def textbook_gptq(W: torch.Tensor, H: torch.Tensor, fmt, damp: float) -> torch.Tensor:
    """GPTQ as the paper states it, one column at a time with no lazy batches, groups fitted on the
    error-updated weights when their first column is reached. Returns the dequantized weight."""
    W = W.double().clone()
    cols = W.shape[1]
    U, _ = inverse_hessian_factor(H.double(), damp)
    Q = torch.zeros_like(W)
    params = None
    for j in range(cols):
        if j % fmt.group_size == 0:
            grp = W[:, j:j + fmt.group_size].float().unsqueeze(1)              # (rows, 1, gs)
            params = {k: v[:, 0] for k, v in fmt.fit(grp).items()}   # (rows, 1)
        q = fmt.dequantize(fmt.quantize(W[:, j:j + 1].float(), params), params).double()
        Q[:, j:j + 1] = q
        err = (W[:, j:j + 1] - q) / U[j, j]
        W[:, j + 1:] -= err @ U[j:j + 1, j + 1:]
    return Q.float()


def rel_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D) / torch.einsum("oi,ij,oj->", W.double(), H.double(),
                                                                             W.double()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="int")
    ap.add_argument("--calib", default="wiki-train")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--eval-text", default="wiki")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--damps", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--textbook-layers", type=int, default=7, help="layers also solved by the textbook GPTQ")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = lowbit.load_model(args.model)
    arch = arch_for(model)
    bos = tok.bos_token_id if arch.bos_per_window else None
    calib = sample_windows(tok, args.calib, args.nsamples, args.seqlen, seed=0, bos_id=bos)
    ids = torch.tensor(tok(load_text(args.eval_text), add_special_tokens=False)["input_ids"])
    evalw = make_windows(ids, args.seqlen, args.windows, bos)
    H_cal = collect_hessians(model, arch, calib)
    H_eval = collect_hessians(model, arch, evalw)
    fmt = make_format({"format": args.format, "bits": args.bits, "group_size": args.group_size,
                       **({"sym": False} if args.format == "int" else {})})
    variants = ["rtn"] + [f"gptq damp={d}{' act' if a else ''}" for d in args.damps for a in (False, True)]
    rows = []
    for n_done, (name, H) in enumerate(H_cal.items()):
        W = get_module(model, name).weight.detach().float()
        row = {"linear": name}
        Qs = {"rtn": quantize_rtn(W, fmt).dequantize()}
        for d in args.damps:
            for a in (False, True):
                Qs[f"gptq damp={d}{' act' if a else ''}"] = gptq_quantize(W, H, fmt, d, 128, a).dequantize()
        if n_done < args.textbook_layers:
            Qs["textbook gptq damp=0.01"] = textbook_gptq(W, H, fmt, 0.01)
            row["lowbit_vs_textbook_max_abs"] = float((Qs["textbook gptq damp=0.01"] - Qs["gptq damp=0.01"]).abs().max())
        for v, Q in Qs.items():
            row[v] = {"cal": rel_err(W, Q, H), "eval": rel_err(W, Q, H_eval[name])}
        rows.append(row)
        print(f"{name}: " + "  ".join(f"{v} {row[v]['cal']:.4f}/{row[v]['eval']:.4f}" for v in variants), flush=True)
    summary = {}
    for v in variants:
        cal = [r[v]["cal"] for r in rows]
        ev = [r[v]["eval"] for r in rows]
        summary[v] = {"mean_cal": sum(cal) / len(cal), "mean_eval": sum(ev) / len(ev),
                      "layers_better_than_rtn_cal": sum(r[v]["cal"] < r["rtn"]["cal"] for r in rows),
                      "layers_better_than_rtn_eval": sum(r[v]["eval"] < r["rtn"]["eval"] for r in rows)}
    out = {"model": args.model, "format": fmt.spec(), "protocol_version": PROTOCOL_VERSION,
           "calib": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
           "eval": {"text": args.eval_text, "windows": int(evalw.shape[0]), "seqlen": args.seqlen},
           "n_linears": len(rows), "summary": summary, "rows": rows,
           "time_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=1) + "\n")
    for v, s in summary.items():
        print(f"{v:28s} mean rel. output error: calib {s['mean_cal']:.5f}  eval {s['mean_eval']:.5f}  "
              f"layers better than RTN: calib {s['layers_better_than_rtn_cal']}/{len(rows)}  "
              f"eval {s['layers_better_than_rtn_eval']}/{len(rows)}")


if __name__ == "__main__":
    main()
