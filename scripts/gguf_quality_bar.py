"""lowbit's Q4_0 GGUF against llama.cpp's own ``llama-quantize`` Q4_0 of the same fp32 model, at equal file size.

For each model:

* the fp32 model is exported as an F32 GGUF (``lowbit.export.gguf.export``), the input llama.cpp's tools take;
* ``llama-imatrix`` computes an importance matrix on the first ``--imatrix-chunks`` chunks of 512 tokens of
  ``wiki-train`` (lowbit's calibration text; lowbit's own calibration is 128 seeded windows of 512 from it);
* ``llama-quantize ... Q4_0`` with and without that matrix, ``--pure`` (every weight Q4_0, no mixture) and the
  token embedding kept F16, which is what lowbit's export holds (the file sizes are then equal); also
  ``llama-quantize``'s default recipe (token embedding Q6_K or its fallback), for its own file size;
* lowbit checkpoints (``lowbit quantize`` with int4 symmetric groups of 32, the Q4_0 grid) exported to GGUF;
* every file is scored by llama.cpp (llama-cpp-python) on the same token windows: wiki, 40 windows of 512,
  lowbit's protocol (``scripts/gguf_ppl_check.py``'s scorer).

    python scripts/gguf_quality_bar.py --models smollm2-135m --lowbit awq gptq rtn --work /tmp/qbar \\
        --llama-bin /path/to/llama.cpp/build/bin

Writes ``docs/results/export/gguf_quality_bar.{json,md}`` (rows of other models are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_ppl_check import plain_blocks, save_rows, scored_row  # noqa: E402

#: lowbit recipes on the Q4_0 grid (int4, symmetric, groups of 32); calibration: the ``lowbit quantize`` defaults
LOWBIT = {
    "rtn": ["rtn", "--bits", "4", "--group-size", "32", "--sym"],
    "gptq": ["gptq", "--bits", "4", "--group-size", "32", "--sym"],
    "awq": ["awq", "--bits", "4", "--group-size", "32", "--sym"],
}


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, its output appended to ``log``; a failure names the command and the log."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--lowbit", nargs="*", default=[], choices=list(LOWBIT),
                    help="quantize these lowbit recipes (int4 sym g32) and score them (default: none; each takes "
                         "minutes to tens of minutes on a CPU)")
    ap.add_argument("--ckpt", nargs="*", default=[], metavar="NAME=PATH",
                    help="also export and score these existing lowbit checkpoints (int4 sym groups of 32)")
    ap.add_argument("--work", type=Path, required=True, help="folder for checkpoints, GGUF files and logs")
    ap.add_argument("--llama-bin", type=Path, required=True, help="folder holding llama-quantize and llama-imatrix")
    ap.add_argument("--imatrix-chunks", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--rescore", action="store_true", help="score files whose row is already in the JSON again")
    ap.add_argument("--json", type=Path, default=Path("docs/results/export/gguf_quality_bar.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/export/gguf_quality_bar.md"))
    a = ap.parse_args()
    for tool in ("llama-quantize", "llama-imatrix"):
        if not (a.llama_bin / tool).is_file():
            raise SystemExit(f"{a.llama_bin / tool} not found: build llama.cpp's tools (cmake --build ... --target "
                             "llama-quantize llama-imatrix) and pass their folder as --llama-bin")

    import llama_cpp  # noqa: F401  (fail before any long step when the bench extra is missing)
    import lowbit
    from lowbit.api import ppl_windows
    from lowbit.data.texts import pull_text
    from lowbit.eval.ppl import PPLProtocol
    from lowbit.export.gguf import export
    from lowbit.io.checkpoint import read_meta
    from lowbit.models.arch import arch_for

    plain_blocks()
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
        del model
        imat = a.work / f"{model_name}-imatrix.gguf"
        if not imat.is_file():
            t0 = time.perf_counter()
            subprocess.run([str(a.llama_bin / "llama-imatrix"), "-m", str(f32), "-f", str(pull_text("wiki-train", progress=False)),
                            "-o", str(imat), "--chunks", str(a.imatrix_chunks), "-c", "512", "-t", str(a.threads),
                            "--no-repack", "--no-ppl"], env=env_tools, check=True,
                           stdout=open(log, "a"), stderr=subprocess.STDOUT)
            print(f"imatrix: {time.perf_counter() - t0:.0f} s")
        files = {}
        for name, extra in (("llama-quantize Q4_0 (pure, embedding F16)", ["--pure", "--token-embedding-type", "f16"]),
                            ("llama-quantize Q4_0 (pure, embedding F16) + imatrix",
                             ["--pure", "--token-embedding-type", "f16", "--imatrix", str(imat)]),
                            ("llama-quantize Q4_0 (its default recipe)", []),
                            ("llama-quantize Q4_0 (its default recipe) + imatrix", ["--imatrix", str(imat)])):
            out = a.work / f"{model_name}-llq-{len(files)}.gguf"
            if not out.is_file():
                cmd = [str(a.llama_bin / "llama-quantize"), *extra, str(f32), str(out), "Q4_0", str(a.threads)]
                with open(log, "a") as f:
                    subprocess.run(cmd, env=env_tools, check=True, stdout=f, stderr=subprocess.STDOUT)
            files[name] = (out, "llama-quantize " + " ".join(x if x != str(imat) else "IMATRIX" for x in extra)
                           + " F32 Q4_0")
        ckpts = {f"lowbit {key.upper()} int4 sym g32 -> Q4_0": (a.work / f"{model_name}-lowbit-{key}", LOWBIT[key])
                 for key in a.lowbit}
        ckpts.update({f"{name if name.startswith('lowbit ') else 'lowbit ' + name} -> Q4_0": (Path(path), None)
                      for name, path in (c.split("=", 1) for c in a.ckpt)})
        for name, (ckpt, flags) in ckpts.items():
            if not (ckpt / "lowbit.json").is_file():
                if flags is None:
                    raise SystemExit(f"--ckpt {ckpt}: not a lowbit checkpoint")
                run([sys.executable, "-m", "lowbit", "quantize", model_name, "--method", *flags, "--out", str(ckpt)],
                    a.work / f"quantize-{ckpt.name}.log")
            out = a.work / f"{ckpt.name}.gguf"
            if not out.is_file():
                m, _ = lowbit.load_model(str(ckpt))
                export(m, read_meta(ckpt), out, tokenizer=ckpt)
                del m
            recipe = read_meta(ckpt)["summary"]["recipe"]
            files[name] = (out, f"lowbit {recipe['method']} {recipe['fmt']} calib {recipe['calib']} ({ckpt.name})")
        for name, (path, recipe) in files.items():
            old = next((r for r in rows if (r["model"], r["name"]) == (model_name, name)), None)
            if old and not a.rescore and old["gguf_mb"] == round(path.stat().st_size / 1e6, 2):
                continue   # scored before, same file size
            row = scored_row(path, windows, a.threads, model=model_name, name=name, recipe=recipe,
                             imatrix_chunks=a.imatrix_chunks if "imatrix" in name else None)
            print(json.dumps({k: v for k, v in row.items() if k != "protocol"}), flush=True)
            rows = [r for r in rows if (r["model"], r["name"]) != (model_name, name)] + [row]
            write_report(rows, a.json, a.md)


def write_report(rows: list[dict], json_path: Path, md_path: Path) -> None:
    lines = [
        "# Q4_0 GGUF: lowbit against llama.cpp's llama-quantize, same fp32 model, same windows",
        "",
        "`scripts/gguf_quality_bar.py`. Every file is scored by llama.cpp (llama-cpp-python) on the same token ids: "
        "wiki (protocol v2), 40 windows of 512 tokens. llama-quantize starts from lowbit's F32 GGUF of the fp32 model; "
        "its importance matrix is llama-imatrix on the first 128 chunks of 512 tokens of wiki-train (lowbit's "
        "calibration text; lowbit calibrates on 128 seeded windows of 512 from it). `pure, embedding F16` rows hold "
        "exactly the tensors and block types of lowbit's export (every decoder weight Q4_0, token embedding F16), "
        "so their files are the same size; the `default recipe` rows are llama-quantize's own choice, for reference.",
        "",
        "| model | file | wiki ppl (llama.cpp) | GGUF MB | block types |",
        "|---|---|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["ppl_llama_cpp"])):
        types = ", ".join(f"{k} x{v}" for k, v in r["block_types"].items())
        lines.append(f"| {r['model']} | {r['name']} | {r['ppl_llama_cpp']:.3f} | {r['gguf_mb']:.1f} | {types} |")
    save_rows(rows, json_path, md_path, lines)


if __name__ == "__main__":
    main()
