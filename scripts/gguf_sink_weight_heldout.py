"""Choose GPTQ's ``--first-position-weight`` W on held-out calibration text, then score the Q4_0 files elsewhere.

The selection text is ``wiki-train`` windows that no candidate saw: 512-token blocks that overlap none of the 128
seeded calibration windows (seed 0, what ``lowbit quantize`` samples) and lie after llama-imatrix's first 128
chunks; 40 of them, evenly spaced. For each W, ``lowbit quantize ... gptq --bits 4 --group-size 32 --sym
--gptq-scale-search --first-position-weight W`` (reused when present) is exported to Q4_0 GGUF; every file
(those and ``--compare`` files, e.g. llama-quantize's) is scored by llama.cpp (``llama_cpp_ppl``, one thread) on
the held-out windows, on wiki and on austen (40 x 512, lowbit's windows, no BOS: SmolLM2).

    python scripts/gguf_sink_weight_heldout.py --work /tmp/qbar --weights 1 100 \\
        --compare "llama-quantize Q4_0 pure=/tmp/qbar/smollm2-135m-llq-0.gguf" \\
                  "llama-quantize Q4_0 pure + imatrix=/tmp/qbar/smollm2-135m-llq-1.gguf"

Scores accumulate in ``--json`` (a rerun scores only what is missing).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_ppl_check import llama_cpp_ppl  # noqa: E402


def heldout_windows(tok, n: int = 40, seqlen: int = 512, nsamples: int = 128, seed: int = 0, skip_chunks: int = 128):
    """``(n, seqlen)`` wiki-train blocks disjoint from the calibration windows and the imatrix chunks."""
    from lowbit.data.texts import load_text

    ids = torch.tensor(tok(load_text("wiki-train"), add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)   # as lowbit.data.calib.sample_windows draws them
    covered = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g).tolist():
        covered[s:s + seqlen] = True
    free = [b for b in range(skip_chunks, ids.numel() // seqlen) if not covered[b * seqlen:(b + 1) * seqlen].any()]
    if len(free) < n:
        raise SystemExit(f"only {len(free)} held-out blocks of {seqlen} tokens; ask for fewer windows")
    pick = free[::len(free) // n][:n]
    return torch.stack([ids[b * seqlen:(b + 1) * seqlen] for b in pick])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoints and GGUF files")
    ap.add_argument("--weights", nargs="+", type=float, default=[1, 100])
    ap.add_argument("--compare", nargs="*", default=[], metavar="NAME=GGUF")
    ap.add_argument("--json", type=Path, default=Path("docs/results/export/gguf_sink_weight_heldout.json"))
    a = ap.parse_args()

    import lowbit
    from lowbit.eval.ppl import PPLProtocol, ppl_windows
    from lowbit.export.gguf import export
    from lowbit.io.checkpoint import read_meta

    _, tok = lowbit.load_model(a.model)
    texts = {"wiki-train held-out": heldout_windows(tok)}
    for corpus in ("wiki", "austen"):
        texts[corpus] = ppl_windows(tok, None, PPLProtocol(corpus, 512, 40, False))
    files = dict(c.split("=", 1) for c in a.compare)
    for w in a.weights:
        ck = a.work / f"{a.model}-gptq-ss-fw{w:g}"
        if not (ck / "lowbit.json").is_file():
            subprocess.run([sys.executable, "-m", "lowbit", "quantize", a.model, "--method", "gptq", "--bits", "4",
                            "--group-size", "32", "--sym", "--gptq-scale-search", "--first-position-weight", f"{w:g}",
                            "--out", str(ck)], check=True)
        gguf = a.work / f"{ck.name}.gguf"
        if not gguf.is_file():
            m, _ = lowbit.load_model(str(ck))
            export(m, read_meta(ck), gguf, tokenizer=ck)
            del m
        files[f"lowbit GPTQ scale search, W={w:g}"] = str(gguf)
    res = json.loads(a.json.read_text()) if a.json.is_file() else {}
    for name, path in files.items():
        for t, win in texts.items():
            key = f"{name} | {t}"
            if key not in res:
                res[key] = {"ppl": round(llama_cpp_ppl(path, win, 1), 4), "gguf_mb": round(Path(path).stat().st_size / 1e6, 2)}
                print(key, res[key], flush=True)
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
