"""How much the K-quant search lowers the weight error against plain RTN on the same K-quant grid.

For each zoo model, every decoder-block linear whose rows are whole super-blocks of 256 columns (SmolLM2's
down_proj, Gemma-3's o_proj and down_proj) is quantized to each K type three ways, all on ggml's grid:

- ``rtn``: :meth:`lowbit.formats.KQuantFormat.fit` (per sub-block min/max, sub-scales rounded onto the
  super-block grid, codes rounded);
- ``ksearch``: :func:`lowbit.formats.kquant.search_kquant` with no importance (plain weight error);
- ``ksearch-imatrix``: the same search weighted by the mean square of each input channel on calibration
  windows (``--calib-windows`` x 512 tokens of ``wiki-train``, seed 0; llama.cpp's importance matrix), as
  ``lowbit quantize --method ksearch-imatrix`` computes it;
- ``ggml`` and ``ggml-imatrix``: llama.cpp's own quantizer for the type (``ggml_quantize_chunk`` of the ggml
  library llama-cpp-python ships), without and with that importance vector, read back with gguf-py.

Reported per model, layer kind and type, summed over the layers: the relative weight error
``sum (W - Q)^2 / sum W^2`` and the importance-weighted one ``sum_c imp_c (W - Q)_c^2 / sum_c imp_c W_c^2``,
and the search's seconds.

    python scripts/kquant_search_error.py --models smollm2-135m gemma3-270m
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np
import torch


def ggml_quantizer():
    """llama.cpp's quantizer as ``quantize(w (rows, cols) float32, qtype, imatrix (cols,) or None) -> w_hat``,
    or None without llama-cpp-python."""
    try:
        import gguf
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None) -> torch.Tensor:
        t = gguf.GGMLQuantizationType[qtype]
        x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        rows, cols = x.shape
        block, size = gguf.GGML_QUANT_SIZES[t]
        out = np.zeros((rows, cols // block * size), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
        lib.ggml_quantize_init(int(t))
        lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                None if im is None else im.ctypes.data)
        return torch.from_numpy(gguf.quants.dequantize(out, t).reshape(rows, cols))

    return quantize


def importance(model, tok, arch, names: list[str], windows: int) -> dict[str, torch.Tensor]:
    """Mean square of each input channel of the named linears over ``windows`` calibration windows."""
    from lowbit.data.calib import sample_windows
    from lowbit.models.arch import get_module

    bos = tok.bos_token_id if arch.bos_per_window else None
    ids = sample_windows(tok, "wiki-train", windows, 512, seed=0, bos_id=bos)
    sums, count, handles = {}, {}, []
    for name in names:
        def hook(_m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            count[name] = count.get(name, 0) + x.shape[0]
        handles.append(get_module(model, name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in handles:
        h.remove()
    return {n: sums[n] / count[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--types", nargs="+", default=["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--json", type=Path, default=Path("docs/results/export/kquant_search.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/results/export/kquant_search.md"))
    a = ap.parse_args()

    import lowbit
    from lowbit.config import parse_format_tag
    from lowbit.formats import quantize_rtn
    from lowbit.formats.kquant import SUPER_BLOCK, search_kquant
    from lowbit.methods.ksearch import KSearchConfig
    from lowbit.models.arch import arch_for, get_module
    from lowbit.utils import atomic_write_text

    cfg = KSearchConfig()
    ggml = ggml_quantizer()
    rows = []
    for model_name in a.models:
        model, tok = lowbit.load_model(model_name)
        arch = arch_for(model)
        names = [f"{arch.blocks}.{i}.{lin}" for i, block in enumerate(get_module(model, arch.blocks))
                 for lin in arch.linears if get_module(block, lin).in_features % SUPER_BLOCK == 0]
        imp = importance(model, tok, arch, names, a.calib_windows)
        for tag in a.types:
            fmt = parse_format_tag(tag).make()
            acc: dict[tuple, list[float]] = {}
            for name in names:
                w = get_module(model, name).weight.detach().float()
                om = imp[name] / imp[name].mean()
                kind = name.rsplit(".", 1)[-1]
                t0 = time.perf_counter()
                found = {"ksearch": search_kquant(w, fmt, None, cfg.ks_grid, cfg.ks_iters)}
                t_search = time.perf_counter() - t0
                found["ksearch-imatrix"] = search_kquant(w, fmt, imp[name], cfg.ks_grid, cfg.ks_iters)
                found["rtn"] = quantize_rtn(w, fmt)
                w_hat = {k: qw.dequantize() for k, qw in found.items()}
                if ggml is not None:
                    w_hat["ggml"] = ggml(w, fmt.ktype.ggml, None)
                    w_hat["ggml-imatrix"] = ggml(w, fmt.ktype.ggml, imp[name])
                for solver, q in w_hat.items():
                    d = q - w
                    sums = acc.setdefault((kind, solver), [0.0, 0.0, 0.0, 0.0, 0.0])
                    sums[0] += float((d * d).sum())
                    sums[1] += float((w * w).sum())
                    sums[2] += float((d * d * om).sum())
                    sums[3] += float((w * w * om).sum())
                    sums[4] += t_search if solver == "ksearch" else 0.0
            for (kind, solver), s in acc.items():
                rows.append({"model": model_name, "layers": kind, "n_layers": sum(n.endswith(kind) for n in names),
                             "type": tag, "solver": solver, "rel_err": s[0] / s[1], "rel_err_imatrix": s[2] / s[3],
                             "search_s": round(s[4], 2)})
                print(json.dumps(rows[-1]))
    doc = {"rows": rows, "ks_grid": cfg.ks_grid, "ks_iters": cfg.ks_iters, "calib_windows": a.calib_windows,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.json, json.dumps(doc, indent=1) + "\n")
    write_md(doc, a.md)


def write_md(doc: dict, md: Path) -> None:
    from lowbit.utils import atomic_write_text

    by = {(r["model"], r["layers"], r["type"], r["solver"]): r for r in doc["rows"]}

    def err(key, solver, field):
        r = by.get((*key, solver))
        return "-" if r is None else f"{r[field]:.3e}"

    def gain(key, solver, field):
        r, base = by.get((*key, solver)), by[(*key, "rtn")]
        return "-" if r is None else f"{100 * (1 - r[field] / base[field]):.1f}%"

    lines = [
        "# K-quant search against RTN on the same K-quant grid, and against llama.cpp's quantizer: weight error",
        "",
        f"`scripts/kquant_search_error.py`: every decoder-block linear whose rows are whole super-blocks of 256 "
        f"columns, quantized to each K type by RTN (`KQuantFormat.fit`), by the search with no importance "
        f"(`ksearch`), by the search weighted by the calibration inputs' mean square per input channel "
        f"(`ksearch-imatrix`; {doc['calib_windows']} x 512 tokens of wiki-train, seed 0), and by llama.cpp's own "
        f"quantizer for the type (`ggml_quantize_chunk` of the ggml library in llama-cpp-python, without and with "
        f"that importance vector). Search settings: grid {doc['ks_grid']}, {doc['ks_iters']} refinement rounds. "
        f"`weight err`: sum (W - Q)^2 / sum W^2 over the layers; `imatrix err`: the same with each input channel "
        f"weighted by its importance. `gain`: 1 - error / RTN's error. `s`: seconds of the data-free search over the "
        f"layers (one thread on a shared 2-core CPU).",
        "",
        "llama.cpp's quantizer weighs its own error terms (without an importance vector, by a function of the "
        "weights themselves; with one, by the importance times a function of the weights), so its objective is "
        "close to, not the same as, either column's.",
        "",
        "| model | layers | type | RTN weight err | ksearch | gain | llama.cpp | gain | RTN imatrix err "
        "| ksearch-imatrix | gain | llama.cpp imatrix | gain | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, layers, tag, solver), r in by.items():
        if solver != "rtn":
            continue
        key = (model, layers, tag)
        lines.append(" | ".join([
            f"| {model}", f"{layers} x{r['n_layers']}", tag, err(key, "rtn", "rel_err"),
            err(key, "ksearch", "rel_err"), gain(key, "ksearch", "rel_err"),
            err(key, "ggml", "rel_err"), gain(key, "ggml", "rel_err"), err(key, "rtn", "rel_err_imatrix"),
            err(key, "ksearch-imatrix", "rel_err_imatrix"), gain(key, "ksearch-imatrix", "rel_err_imatrix"),
            err(key, "ggml-imatrix", "rel_err_imatrix"), gain(key, "ggml-imatrix", "rel_err_imatrix"),
            f"{by[(*key, 'ksearch')]['search_s']} |"]))
    atomic_write_text(md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
