"""What int8 activations (``LOWBIT_KERNEL_ACT=q8``) cost in quality: perplexity and greedy tokens.

For each zoo model and format, the model is RTN-quantized in memory exactly as the decode
benchmark does it (decoder blocks and LM head), then measured twice:

- perplexity (wiki, the leaderboard's windows): once as stored (exact float inputs), once with every
  quantized linear's input replaced by ``quantize_act_q8`` (``lowbit.kernels.reference``), the
  plain-torch twin of the ``gemm_q8`` kernel (tests/test_kernels.py checks they agree); NF tables, which
  the kernel rounds to integers, also get its weight (``linear_q8_ref``);
- next-token agreement: on the first ``--agree-windows`` ppl windows, the share of positions where
  the arg-max token is the same with and without int8 inputs;
- free-running greedy generations through the lean decode loop, i.e. the real kernels, with
  ``LOWBIT_KERNEL_ACT=fp32`` and ``=q8``: how many tokens agree before the first difference. As a
  control, the same count between two exact-input paths (the fused kernels and ``LOWBIT_KERNELS=0``,
  dequantize + matmul), which differ only in float summation order: a tiny model's greedy text
  forks at the first near-tie, so this count alone says little.

    python scripts/q8_quality.py --models smollm2-135m --formats int4-g128 fp4-g128 \\
        --json docs/results/speed/q8_quality.json --md docs/results/speed/q8_quality.md
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _q8_hooks(model):
    from lowbit.nn.kernel_layouts import layout_for
    from lowbit.kernels.reference import linear_q8_ref, quantize_act_q8
    from lowbit.nn import QuantizedLinear

    handles = []
    for m in model.modules():
        lay = layout_for(m) if isinstance(m, QuantizedLinear) else None
        if lay is None or not getattr(lay, "q8_capable", False):
            continue
        if lay.q8 is not None and not lay.q8.exact:  # NF: the kernel's rounded table changes the weight too
            handles.append(m.register_forward_hook(lambda m_, args, _out, lay=lay: linear_q8_ref(args[0], lay, m_.bias)))
        else:
            gs = lay.group_size
            handles.append(m.register_forward_pre_hook(lambda _m, args, gs=gs: (quantize_act_q8(args[0], gs),)))
    return handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--formats", nargs="+", default=["int4-g128", "fp4-g128"])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--agree-windows", type=int, default=8)
    ap.add_argument("--json", default="docs/results/speed/q8_quality.json")
    ap.add_argument("--md", default="docs/results/speed/q8_quality.md")
    args = ap.parse_args()

    from lowbit.api import PPLProtocol, evaluate_ppl, ppl_windows
    from lowbit.bench.decode import PROMPT, lowbit_model, prompt_model
    from lowbit.kernels import use_kernel_activations
    from lowbit.models.arch import arch_for
    from lowbit.runtime import LeanDecoder
    from lowbit.utils import env_var

    rows = []
    for name in args.models:
        base, tok, ids = prompt_model(name)
        for tag in args.formats:
            model = lowbit_model(base, tag).eval()
            ppl, proto = evaluate_ppl(model, tok, "wiki", args.seqlen, args.windows, progress=False)
            handles = _q8_hooks(model)
            try:
                ppl_q8, _ = evaluate_ppl(model, tok, "wiki", args.seqlen, args.windows, progress=False)
            finally:
                for h in handles:
                    h.remove()
            win = ppl_windows(tok, model, PPLProtocol("wiki", args.seqlen, args.windows,
                                                      arch_for(model).bos_per_window))[: args.agree_windows]
            with torch.no_grad():
                top = [model(w[None]).logits[0].argmax(-1) for w in win]
                handles = _q8_hooks(model)
                try:
                    top_q8 = [model(w[None]).logits[0].argmax(-1) for w in win]
                finally:
                    for h in handles:
                        h.remove()
            agree = float(torch.cat([a == b for a, b in zip(top, top_q8)]).float().mean())
            gens = {}
            for key, act, kernels in (("fp32", "fp32", "1"), ("q8", "q8", "1"), ("ref", "fp32", "0")):
                with env_var("LOWBIT_KERNELS", kernels), use_kernel_activations(act):
                    dec = LeanDecoder(model, max_len=ids.shape[1] + args.new_tokens + 8)
                    gens[key] = dec.generate(ids, args.new_tokens)[0, ids.shape[1]:].tolist()

            def prefix(a, b):
                return next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), len(a))

            same, same_ref = prefix(gens["fp32"], gens["q8"]), prefix(gens["fp32"], gens["ref"])
            row = {"model": name, "format": tag, "ppl": ppl, "ppl_q8": ppl_q8, "ppl_ratio": ppl_q8 / ppl,
                   "top1_agreement": agree, "agree_windows": len(win),
                   "greedy_tokens": args.new_tokens, "greedy_same_prefix": same, "greedy_same_prefix_ref": same_ref,
                   "protocol": proto}
            rows.append(row)
            print(f"{name} {tag}: ppl {ppl:.3f} -> q8 {ppl_q8:.3f} ({100 * (ppl_q8 / ppl - 1):+.2f}%), next-token "
                  f"agreement {100 * agree:.1f}%, greedy identical for {same}/{args.new_tokens} "
                  f"(exact kernels vs dequantize+matmul: {same_ref})", flush=True)
    res = {"rows": rows, "env": {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                                 "quantization": "RTN, decoder blocks and LM head (as bench-decode)",
                                 "prompt": PROMPT}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    lines = ["Generated by `scripts/q8_quality.py`; raw numbers in "
             f"`{Path(args.json).as_posix()}`. Each model is RTN-quantized in memory as `lowbit bench-decode` does "
             "(decoder blocks and LM head, same format). ppl: wiki, first "
             f"{args.windows} windows of {args.seqlen} tokens, exact float inputs vs every quantized linear's "
             "input quantized to int8 per block of 32 (`quantize_act_q8`, the plain-torch twin of the `gemm_q8` "
             f"kernel). Next-token agreement: arg-max of the logits at every position of the first "
             f"{args.agree_windows} windows, with and without int8 inputs. Greedy: {args.new_tokens} tokens from the "
             "decode benchmark's prompt through the lean decode loop (the kernels themselves), `LOWBIT_KERNEL_ACT=fp32` "
             "against `=q8`; the control column forks two exact-input paths (fused kernels against "
             "`LOWBIT_KERNELS=0`, dequantize + matmul) that differ only in float summation order.", "",
             "| model | format | ppl (fp32 inputs) | ppl (q8 inputs) | change | next-token agreement | greedy: same tokens before the first fork, q8 | control: exact vs exact |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['ppl']:.3f} | {r['ppl_q8']:.3f} | "
                     f"{100 * (r['ppl_ratio'] - 1):+.2f}% | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['greedy_same_prefix']}/{r['greedy_tokens']} | {r['greedy_same_prefix_ref']}/{r['greedy_tokens']} |")
    Path(args.md).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("wrote", args.json, "and", args.md)


if __name__ == "__main__":
    main()
