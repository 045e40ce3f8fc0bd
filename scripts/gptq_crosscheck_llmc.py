"""An independent GPTQ (llm-compressor) against lowbit's, on the same calibration and evaluation tokens.

Two steps, because llm-compressor pins its own transformers and lives in a venv of its own:

    # 1. in lowbit's venv: the token ids (128 x 512 wiki-train windows, seed 0; wiki 40 x 512 windows)
    python scripts/gptq_crosscheck_llmc.py ids --model smollm2-135m --out /tmp/ids.pt
    # 2. in a venv with llmcompressor (pip install llmcompressor): RTN and GPTQ, scored on those windows
    python scripts/gptq_crosscheck_llmc.py run --ids /tmp/ids.pt --group-size 64 \
        --out docs/results/diag/gptq_llmc_smollm2_int4_g64.json

Step 2 quantizes every decoder linear (not the head) to int4 asymmetric with the group size given:
llm-compressor's QuantizationModifier (round to nearest, min-max) and its GPTQModifier (damping 0.01, block
128, no activation ordering, then with static activation ordering), each from the float model, and
scores the same windows as lowbit's protocol v2 (mean token NLL over every window, exponentiated).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def dump_ids(args) -> None:
    import lowbit.api as api
    from lowbit.config import EvalConfig
    from lowbit.data.calib import sample_windows
    from lowbit.eval.ppl import PPLProtocol
    from lowbit.models.arch import arch_for
    from lowbit.models.zoo import model_dir

    model, tok = api.load_model(args.model)
    arch = arch_for(model)
    bos = tok.bos_token_id if arch.bos_per_window else None
    ev = EvalConfig()
    calib = sample_windows(tok, "wiki-train", 128, 512, 0, bos_id=bos)
    windows = api.ppl_windows(tok, model, PPLProtocol("wiki", ev.seqlen, ev.windows, arch.bos_per_window))
    torch.save({"model_dir": str(model_dir(args.model)), "calib": calib, "windows": windows}, args.out)
    print(f"{args.out}: calib {tuple(calib.shape)}, windows {tuple(windows.shape)}")


@torch.no_grad()
def ppl(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model(input_ids=w.unsqueeze(0)).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        n += w.numel() - 1
    return math.exp(nll / n)


def run(args) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    import llmcompressor

    data = torch.load(args.ids)
    calib, windows = data["calib"], data["windows"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                             "strategy": "group", "group_size": args.group_size}}}
    variants = {
        "rtn": lambda: QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
        "gptq": lambda: GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                                     actorder=None),
        "gptq_actorder": lambda: GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01,
                                              block_size=128, actorder="static"),
    }
    rows = []
    base = AutoModelForCausalLM.from_pretrained(data["model_dir"], torch_dtype=torch.float32)
    rows.append({"variant": "fp32", "ppl_wiki": ppl(base, windows)})
    print(rows[-1], flush=True)
    for name in args.variants:
        model = AutoModelForCausalLM.from_pretrained(data["model_dir"], torch_dtype=torch.float32)
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=variants[name](), num_calibration_samples=len(calib),
                max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
        rows.append({"variant": name, "ppl_wiki": ppl(model, windows), "quant_s": round(time.perf_counter() - t0)})
        print(rows[-1], flush=True)
        out = {"model_dir": data["model_dir"], "group_size": args.group_size, "bits": 4, "sym": False,
               "calibration": "lowbit wiki-train v2, 128 x 512, seed 0 (same token ids)",
               "evaluation": f"lowbit wiki v2, {windows.shape[0]} x {windows.shape[1]} (same token ids)",
               "llmcompressor": llmcompressor.__version__, "threads": torch.get_num_threads(), "rows": rows}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ids")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--out", required=True)
    b = sub.add_parser("run")
    b.add_argument("--ids", required=True)
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--variants", nargs="+", default=["rtn", "gptq", "gptq_actorder"])
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    (dump_ids if args.cmd == "ids" else run)(args)


if __name__ == "__main__":
    main()
