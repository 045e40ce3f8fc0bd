"""Fingerprints of a fixed set of small quantization results, to show that a refactor changed nothing.

Runs on the CPU with one thread: RTN int4 g128 and GPTQ int3 g128 (32 x 512 calibration windows from
``wiki-train``, seed 0) on SmolLM2-135M with ``wiki`` perplexity over 8 windows of 512 tokens, and VPTQ
(with a codebook fine-tuning step) on a tiny random Llama. For each it prints the sha256 of the quantized
state dict and the perplexity or logits digest; run it before and after a change and compare the JSON.

    python scripts/golden_check.py --out before.json   # on the old commit
    python scripts/golden_check.py --out after.json    # on the new one
    diff before.json after.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch


def state_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def zoo_case(method: str, bits: int, method_config: dict) -> dict:
    import lowbit
    import lowbit.api
    from lowbit.config import FormatConfig
    from lowbit.quantize import QuantRecipe
    from lowbit.data.calib import sample_windows

    model, tok = lowbit.load_model("smollm2-135m")
    recipe = QuantRecipe(method=method, fmt=FormatConfig(bits=bits, group_size=128),
                                method_config=method_config,
                                calib={"source": "wiki-train", "nsamples": 32, "seqlen": 512, "seed": 0})
    calib = None
    if method != "rtn":
        calib = sample_windows(tok, "wiki-train", 32, 512, 0)
    lowbit.quantize(model, recipe, calib, progress=False)
    ppl, _ = lowbit.api.evaluate_ppl(model, tok, "wiki", 512, 8, progress=False)
    return {"state": state_digest(model), "ppl": repr(ppl)}


def vptq_case() -> dict:
    import lowbit
    import lowbit.api
    from lowbit.quantize import QuantRecipe
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_model

    model = tiny_model("llama", seed=0)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=g)
    recipe = QuantRecipe(method="vptq", method_config={"vector_len": 4, "codebook_size": 64,
                                                              "ft_steps": 2, "kmeans_iters": 5})
    lowbit.quantize(model, recipe, calib, progress=False)
    with torch.no_grad():
        logits = model(calib[:2]).logits
    return {"state": state_digest(model), "logits": tensor_digest(logits)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-zoo", action="store_true", help="only the tiny-model case (no zoo model needed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res = {"vptq_tiny": vptq_case()}
    if not args.skip_zoo:
        res["rtn_int4_g128"] = zoo_case("rtn", 4, {})
        res["gptq_int3_g128"] = zoo_case("gptq", 3, {})
    Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(json.dumps(res, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
