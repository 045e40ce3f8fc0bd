"""Does llama.cpp run lowbit's GGUF export as lowbit runs the checkpoint? Perplexity on the same token windows.

For each model and config, a checkpoint is made with ``lowbit quantize`` (RTN, groups of 32, or a K-quant
format with RTN or the K-quant search; reused when it exists), scored by lowbit (``lowbit.api.evaluate_ppl``: the protocol ``lowbit eval`` uses, wiki, 40 windows
of 512 tokens, BOS per the architecture), exported with ``lowbit.export.gguf.export`` and scored by llama.cpp
through llama-cpp-python on exactly the token windows lowbit scored (``lowbit.api.ppl_windows``), every
position's logits (``logits_all=True``), one window per fresh context. The table also says whether
llama.cpp's own tokenizer, read from the GGUF, splits the text into the same ids as the checkpoint's.

llama.cpp quantizes the activations to 8 bits for its Q4/Q5/Q8 dot products (to fp16 for F16 weights), keeps
its KV cache in fp16 and sums in another order, so the two perplexities differ slightly even though the weights
are bit-identical (symmetric types) or within half an fp16 ulp of the block offset (Q4_1/Q5_1). The ``f16``
config, the float model exported as F16, measures that difference with no quantized weight in the file.

The K-quant configs (``q4_k``, ``q6_k``, ...) quantize the layers whose rows are whole super-blocks of 256 (SmolLM2's
down_proj, Gemma-3's o_proj and down_proj) with the K type and the others with the type's int fallback (q4_k:
Q4_1, q6_k: Q8_0, q2_k/q3_k: Q4_0, q5_k: Q5_1); the row lists the GGUF's block types. For K-quant weights llama.cpp
rounds the activations to int8 blocks of 256 (Q8_K, a float32 scale), which ``lowbit, act8`` mimics for them.

    pip install llama-cpp-python gguf
    python scripts/gguf_ppl_check.py --models smollm2-135m --configs f16 q4_0 q4_1 q8_0 --work /tmp/gguf-work
    python scripts/gguf_ppl_check.py --models gemma3-270m --configs q4_0 --work /tmp/gguf-work
    python scripts/gguf_ppl_check.py --models smollm2-135m gemma3-270m --configs q4_k q6_k --work /tmp/gguf-work
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

#: config -> (lowbit quantize flags after ``--method``, the GGUF type it maps to); "f16" is the control: the float
#: model with every weight rounded to fp16, so the difference is llama.cpp's own arithmetic with no quantized weight
#: in the file. A K-quant config's type names the K type; the row records every block type the file holds.
CONFIGS = {
    "f16": (None, "F16"),
    "q4_0": (["rtn", "--bits", "4", "--group-size", "32", "--sym"], "Q4_0"),
    "q4_1": (["rtn", "--bits", "4", "--group-size", "32", "--no-sym"], "Q4_1"),
    "q5_0": (["rtn", "--bits", "5", "--group-size", "32", "--sym"], "Q5_0"),
    "q8_0": (["rtn", "--bits", "8", "--group-size", "32", "--sym"], "Q8_0"),
    "q2_k": (["rtn", "--format", "q2_k"], "Q2_K"),
    "q3_k": (["rtn", "--format", "q3_k"], "Q3_K"),
    "q4_k": (["rtn", "--format", "q4_k"], "Q4_K"),
    "q4_k-search": (["ksearch", "--format", "q4_k"], "Q4_K"),
    "q5_k": (["rtn", "--format", "q5_k"], "Q5_K"),
    "q6_k": (["rtn", "--format", "q6_k"], "Q6_K"),
}


def plain_blocks() -> None:
    """Have llama.cpp compute on the blocks the file holds, without extra buffer types (AMX or repacked copies of
    the weights): the check reads what the export wrote, and AMX tiles fault on hosts whose kernel does not enable
    them (a VM's, for one)."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params


def llama_cpp_ppl(gguf_path: Path, windows, threads: int) -> float:
    """Mean next-token NLL over every position of every window (lowbit's rule), exponentiated."""
    from llama_cpp import Llama

    n = windows.shape[1]
    llm = Llama(str(gguf_path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True, verbose=False, n_threads=threads)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:n], dtype=np.float64)[:-1]             # (n-1, vocab)
        mx = logits.max(-1, keepdims=True)
        logp = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(n - 1), row[1:]].sum())
        count += n - 1
    return math.exp(nll / count)


def act_q8k(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ggml's Q8_K holds it: blocks of 256 columns, int8 codes, a float32 ``d = max|x| / 127`` per block."""
    xb = x.float().unflatten(-1, (-1, 256))
    d = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1.0)), 0.0) * d).flatten(-2)


def _is_kquant(m) -> bool:
    return m.spec.get("format", {}).get("format") == "kquant"


def act8_hooks(model, kquant_only: bool = False) -> list:
    """lowbit with llama.cpp's activation rounding: the input of every quantized linear cut into blocks of 32, each
    rounded to int8 with ``d = max|x| / 127`` (what ggml does to the activations before a Q4/Q5/Q8 dot product), or
    for a K-quant weight into blocks of 256 (Q8_K). ``kquant_only``: only the K-quant layers' inputs."""
    from lowbit.kernels.reference import quantize_act_q8
    from lowbit.nn import QuantizedLinear

    def hook(m):
        if _is_kquant(m):
            return lambda _m, args: (act_q8k(args[0]),)
        return lambda _m, args: (quantize_act_q8(args[0], 32),)

    return [m.register_forward_pre_hook(hook(m)) for m in model.modules()
            if isinstance(m, QuantizedLinear) and (_is_kquant(m) or not kquant_only)]


def ppl_with_hooks(model, tok, hooks, seqlen: int, windows: int) -> float:
    """lowbit's wiki perplexity with ``hooks`` in place, which are removed afterwards."""
    from lowbit.api import evaluate_ppl

    try:
        return evaluate_ppl(model, tok, "wiki", seqlen=seqlen, windows=windows)[0]
    finally:
        for h in hooks:
            h.remove()


def scored_row(gguf_path: Path, windows, threads: int, **fields) -> dict:
    """A results row for one GGUF file scored by llama.cpp on ``windows`` (wiki, protocol v2): ``fields`` first,
    then the perplexity, file MB, block types, scoring seconds, the llama-cpp-python version, protocol and date."""
    import llama_cpp

    t0 = time.perf_counter()
    ppl = llama_cpp_ppl(gguf_path, windows, threads)
    return {**fields, "ppl_llama_cpp": round(ppl, 4), "gguf_mb": round(Path(gguf_path).stat().st_size / 1e6, 2),
            "block_types": block_types(gguf_path), "seconds": round(time.perf_counter() - t0, 1),
            "llama_cpp_python": llama_cpp.__version__,
            "protocol": {"text": "wiki", "seqlen": int(windows.shape[1]), "windows": int(windows.shape[0]), "version": 2},
            "date": time.strftime("%Y-%m-%d %H:%M")}


def block_types(gguf_path: Path) -> dict[str, int]:
    """``{ggml type: count}`` of the file's 2-D tensors, most common first."""
    from gguf import GGUFReader

    n = Counter(t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors if len(t.shape) == 2)
    return dict(n.most_common())


def same_tokens(gguf_path: Path, tokenizer, text: str) -> bool:
    """llama.cpp's tokenizer (from the GGUF) gives the checkpoint tokenizer's ids on ``text``."""
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["smollm2-135m"], help="none: only rewrite the report")
    ap.add_argument("--configs", nargs="+", default=["q4_0", "q4_1", "q8_0"], choices=sorted(CONFIGS))
    ap.add_argument("--work", type=Path, default=Path("out/gguf-check"), help="checkpoints and GGUF files")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--token-chars", type=int, default=20000, help="characters of the text the tokenizers compare on")
    ap.add_argument("--json", type=Path, default=Path("docs/results/export/gguf_ppl.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/export/gguf_ppl.md"))
    ap.add_argument("--lowbit-only", action="store_true",
                    help="score only lowbit's side of rows already in the JSON (their GGUF and llama.cpp numbers kept)")
    a = ap.parse_args()

    import llama_cpp
    import lowbit
    from lowbit.api import evaluate_ppl, ppl_windows
    from lowbit.eval.ppl import PPLProtocol
    from lowbit.data.texts import load_text
    from lowbit.export.gguf import export
    from lowbit.io.checkpoint import read_meta
    from lowbit.models.arch import arch_for

    plain_blocks()
    rows = json.loads(a.json.read_text()).get("rows", []) if a.json.is_file() else []
    for model_name in a.models:
        for cfg in a.configs:
            flags, qtype = CONFIGS[cfg]
            if flags is None:
                model, tok = lowbit.load_model(model_name)
                with torch.no_grad():
                    for p in model.parameters():
                        p.data = p.data.half().float()
                meta, tok_source, recipe = {"storage_dtype": "float16"}, tok, "float, weights rounded to fp16"
            else:
                ckpt = a.work / f"{model_name}-{flags[0]}-{cfg}"
                if not (ckpt / "lowbit.json").is_file():
                    subprocess.run([sys.executable, "-m", "lowbit", "quantize", model_name, "--method", *flags,
                                    "--out", str(ckpt)], check=True)
                model, tok = lowbit.load_model(str(ckpt))
                meta, tok_source, recipe = read_meta(ckpt), ckpt, " ".join(flags)
            t0 = time.perf_counter()
            ppl_lowbit, proto = evaluate_ppl(model, tok, "wiki", seqlen=a.seqlen, windows=a.windows)
            t_lowbit = time.perf_counter() - t0
            ppl_act8 = ppl_act8_k = None
            if flags is not None:
                ppl_act8 = ppl_with_hooks(model, tok, act8_hooks(model), a.seqlen, a.windows)
            if any(_is_kquant(m) for m in model.modules() if hasattr(m, "spec")):
                ppl_act8_k = ppl_with_hooks(model, tok, act8_hooks(model, kquant_only=True), a.seqlen, a.windows)
            old = next((r for r in rows if (r["model"], r["config"]) == (model_name, cfg)), None)
            if a.lowbit_only:
                if old is None:
                    raise SystemExit(f"--lowbit-only: no row {model_name} {cfg} in {a.json} to keep llama.cpp's numbers of")
                ppl_cpp = old["ppl_llama_cpp"]
                cpp = {k: old[k] for k in ("block_types", "ppl_llama_cpp", "gguf_mb", "same_tokenization",
                                           "seconds_llama_cpp", "llama_cpp_python")}
            else:
                out = export(model, meta, a.work / f"{model_name}-{cfg}.gguf", tokenizer=tok_source)
                windows = ppl_windows(tok, model, PPLProtocol("wiki", a.seqlen, a.windows,
                                                              arch_for(model).bos_per_window))
                t0 = time.perf_counter()
                ppl_cpp = llama_cpp_ppl(out, windows, a.threads)
                cpp = {"block_types": block_types(out), "ppl_llama_cpp": round(ppl_cpp, 4),
                       "gguf_mb": round(out.stat().st_size / 1e6, 1),
                       "same_tokenization": same_tokens(out, tok, load_text("wiki")[: a.token_chars]),
                       "seconds_llama_cpp": round(time.perf_counter() - t0, 1),
                       "llama_cpp_python": llama_cpp.__version__}
            row = {
                "model": model_name, "config": cfg, "recipe": recipe, "ggml_type": qtype, **cpp,
                "ppl_lowbit": round(ppl_lowbit, 4),
                "rel_diff_pct": round(100 * (ppl_cpp - ppl_lowbit) / ppl_lowbit, 3),
                "ppl_lowbit_act8": None if ppl_act8 is None else round(ppl_act8, 4),
                "rel_diff_act8_pct": None if ppl_act8 is None else round(100 * (ppl_cpp - ppl_act8) / ppl_act8, 3),
                "ppl_lowbit_act8_kquant": None if ppl_act8_k is None else round(ppl_act8_k, 4),
                "seconds_lowbit": round(t_lowbit, 1),
                "protocol": proto, "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            print(json.dumps({k: v for k, v in row.items() if k != "protocol"}))
            rows = [r for r in rows if (r["model"], r["config"]) != (model_name, cfg)] + [row]

    write_report(rows, a.json, a.md)


def save_rows(rows: list[dict], json_path: Path, md_path: Path, md_lines: list[str]) -> None:
    """``{"rows": rows}`` to ``json_path`` and ``md_lines`` to ``md_path``, each written atomically."""
    from lowbit.utils import atomic_write_text

    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps({"rows": rows}, indent=1) + "\n")
    atomic_write_text(md_path, "\n".join(md_lines) + "\n")


def write_report(rows: list[dict], json_path: Path, md_path: Path) -> None:
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: (r["model"], order.index(r["config"])))
    lines = [
        "# GGUF export: llama.cpp against lowbit, same checkpoint, same token windows",
        "",
        "`scripts/gguf_ppl_check.py`: wiki perplexity, 40 windows of 512 tokens (lowbit's protocol), scored by lowbit "
        "and by llama.cpp (llama-cpp-python) on the same ids; the weights in the GGUF are lowbit's codes and scales "
        "on llama.cpp's block grid, not re-quantized. `same tokens`: llama.cpp's tokenizer, built from the GGUF, "
        "splits the first 20,000 characters of the text into the checkpoint tokenizer's ids.",
        "",
        "Where the two differ: llama.cpp rounds the activations to int8 blocks of 32 before each Q4/Q5/Q8 dot "
        "product. `lowbit, act8` is lowbit with that rounding put in front of every quantized linear; the `F16` row "
        "is the control, the float model with its weights rounded to fp16 for both and exported as F16 (no block "
        "type, so no activation rounding).",
        "",
        "K-quant rows (`--format q4_k`, ...): only the layers whose rows are whole super-blocks of 256 columns take the "
        "K type (SmolLM2: down_proj; Gemma-3: o_proj and down_proj), the others the type's int fallback; `GGUF types` "
        "counts the file's 2-D tensors by block type (the F16 one is the token embedding, which these recipes leave "
        "unquantized). For a K-quant weight llama.cpp rounds the activations to blocks of 256 (Q8_K), which `lowbit, "
        "act8` mimics for those layers; `lowbit, Q8_K on K` rounds only the K-quant layers' inputs so (in brackets: "
        "against `lowbit ppl`), the share of the difference that comes from those layers. `ksearch` is lowbit's "
        "search inside the K-quant structure (docs/formats.md).",
        "",
        "| model | recipe | GGUF types | lowbit ppl | llama.cpp ppl | diff | lowbit, act8 | diff to act8 "
        "| lowbit, Q8_K on K | GGUF MB | same tokens |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        act8, act8_k = r.get("ppl_lowbit_act8"), r.get("ppl_lowbit_act8_kquant")
        types = r.get("block_types")
        types = ", ".join(f"{t} x{n}" for t, n in types.items()) if types and len(types) > 1 else r["ggml_type"]
        lines.append(f"| {r['model']} | {r['recipe']} | {types} | {r['ppl_lowbit']:.3f} | "
                     f"{r['ppl_llama_cpp']:.3f} | {r['rel_diff_pct']:+.2f}% | "
                     + (f"{act8:.3f} | {r['rel_diff_act8_pct']:+.2f}% | " if act8 is not None else "- | - | ")
                     + (f"{act8_k:.3f} ({100 * (act8_k / r['ppl_lowbit'] - 1):+.2f}%) | " if act8_k else "- | ")
                     + f"{r['gguf_mb']} | {'yes' if r['same_tokenization'] else 'no'} |")
    save_rows(rows, json_path, md_path, lines)


if __name__ == "__main__":
    main()
