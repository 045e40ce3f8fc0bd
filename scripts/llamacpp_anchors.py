"""llama.cpp's own quantizations of a zoo model, scored on lowbit's windows: the anchors for size/quality curves.

For each model, lowbit exports the fp32 model as an F32 GGUF (``lowbit.export.gguf.export``), ``llama-quantize``
makes each type with its default recipe (no importance matrix: what a user gets from the plain command), and
llama.cpp (llama-cpp-python) scores every file on lowbit's protocol (wiki v2, 40 windows of 512, BOS per the
architecture; ``scripts/gguf_ppl_check.py``'s scorer). bpw all-in is the file's tensor bits over the model's
parameter count (the tokenizer and metadata are left out, as ``lowbit info`` leaves out the JSON files).

    python scripts/llamacpp_anchors.py --models smollm2-135m gemma3-270m --work /tmp/anchors \\
        --llama-bin /path/to/llama.cpp/build/bin

Writes ``docs/results/mixed/llamacpp_anchors.{json,md}`` (rows of other models and types are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_ppl_check import save_rows, scored_row  # noqa: E402

TYPES = ["Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def tensor_bits(gguf_path: Path) -> tuple[int, int]:
    """(bits of every tensor's data, parameter count) of a GGUF file; a tied head is stored once and counted once."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(gguf_path)).tensors
    return sum(int(t.n_bytes) * 8 for t in tensors), sum(int(t.n_elements) for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--types", nargs="+", default=TYPES, help=f"llama-quantize types (default: {' '.join(TYPES)})")
    ap.add_argument("--work", type=Path, required=True, help="folder for the GGUF files and the tool log")
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder holding llama-quantize")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json", type=Path, default=Path("docs/results/mixed/llamacpp_anchors.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/mixed/llamacpp_anchors.md"))
    a = ap.parse_args()
    if not (a.llama_bin / "llama-quantize").is_file():
        raise SystemExit(f"{a.llama_bin / 'llama-quantize'} not found: build llama.cpp's tools (cmake --build ... "
                         "--target llama-quantize) and pass their folder as --llama-bin")

    import lowbit
    from lowbit.api import ppl_windows
    from lowbit.eval.ppl import PPLProtocol
    from lowbit.export.gguf import export
    from lowbit.models.arch import arch_for

    env_tools = {**os.environ, "LD_LIBRARY_PATH": str(a.llama_bin)}
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.work / "tools.log"
    rows = json.loads(a.json.read_text()).get("rows", []) if a.json.is_file() else []
    for model_name in a.models:
        model, tok = lowbit.load_model(model_name)
        windows = ppl_windows(tok, model, PPLProtocol("wiki", a.seqlen, a.windows, arch_for(model).bos_per_window))
        f32 = a.work / f"{model_name}-f32.gguf"
        if not f32.is_file():
            export(model, {"storage_dtype": "float32"}, f32, tokenizer=tok)
        n_params = sum(p.numel() for p in model.parameters())   # tied weights once, as parameters() yields them
        del model
        for qtype in a.types:
            out = a.work / f"{model_name}-{qtype}.gguf"
            if not out.is_file():
                cmd = [str(a.llama_bin / "llama-quantize"), str(f32), str(out), qtype, str(a.threads)]
                with open(log, "a") as f:
                    f.write("$ " + " ".join(cmd) + "\n")
                    f.flush()
                    if subprocess.run(cmd, env=env_tools, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                        raise SystemExit(f"llama-quantize {qtype} failed; see {log}")
            bits, elements = tensor_bits(out)
            row = scored_row(out, windows, a.threads, model=model_name, type=qtype,
                             recipe=f"llama-quantize F32 {qtype} (default recipe, no imatrix)",
                             tensor_mb=round(bits / 8e6, 2), bpw_all_in=round(bits / n_params, 4),
                             gguf_elements=elements, params=n_params)
            print(json.dumps({k: v for k, v in row.items() if k != "protocol"}), flush=True)
            rows = [r for r in rows if (r["model"], r["type"]) != (model_name, qtype)] + [row]
            write_report(rows, a.json, a.md)


def write_report(rows: list[dict], json_path: Path, md_path: Path) -> None:
    lines = [
        "# llama.cpp anchors: llama-quantize's default recipes, scored on lowbit's windows",
        "",
        "`scripts/llamacpp_anchors.py`. llama-quantize from lowbit's F32 GGUF of the fp32 zoo model, no importance "
        "matrix; every file scored by llama.cpp (llama-cpp-python) on wiki (protocol v2), the windows of each row's protocol (40 of 512 tokens by default). "
        "bpw all-in: the file's tensor bits over the model's parameters (tied embedding and head counted once).",
        "",
        "| model | type | wiki ppl (llama.cpp) | bpw all-in | tensor MB | GGUF MB | block types |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], -r["bpw_all_in"])):
        types = ", ".join(f"{k} x{v}" for k, v in r["block_types"].items())
        lines.append(f"| {r['model']} | {r['type']} | {r['ppl_llama_cpp']:.3f} | {r['bpw_all_in']:.3f} | "
                     f"{r['tensor_mb']:.1f} | {r['gguf_mb']:.1f} | {types} |")
    save_rows(rows, json_path, md_path, lines)


if __name__ == "__main__":
    main()
