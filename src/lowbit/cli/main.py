"""Command line: thin wrapper that parses, calls the library, prints."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .._version import __version__
from ..config import MIX_CANDIDATES, BlockTuneConfig, CalibConfig, EvalConfig, FormatConfig, RotationConfig, StorageConfig
from .args import add_dataclass_args, at_least, dataclass_from_args, int_at_least, parse_shape, windows_arg
from ..errors import ConfigError, LowbitError

log = logging.getLogger("lowbit")


# ---------------------------------------------------------------- arguments

def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from ..methods import get_method, method_names

    g = p.add_argument_group("method and format")
    g.add_argument("--method", default="rtn", help=f"one of: {', '.join(method_names())} (default: rtn)")
    add_dataclass_args(g, FormatConfig)
    seen: dict = {}
    for name in method_names():
        add_dataclass_args(g, get_method(name).config, seen=seen)
    g.add_argument("--embed", default=None, metavar="FMT", help="also quantize the token embedding, e.g. int8 or int4-g128")
    g.add_argument("--head", default=None, metavar="FMT", help="also quantize the LM head, e.g. int8 or int4-g128")
    m = p.add_argument_group("size budget: a format per tensor, least predicted damage (docs/mixed.md)")
    m.add_argument("--target-bpw", type=at_least(0.0, float), default=None, metavar="X",
                   help="bits per weight of the decoder-block linears at most (with --all-in: of every stored tensor "
                        "over the parameter count, the embedding and head chosen too)")
    m.add_argument("--all-in", action="store_true", default=None, help="--target-bpw counts every stored tensor")
    m.add_argument("--target-mb", type=at_least(0.0, float), default=None, metavar="Y",
                   help="MB (10^6 bytes) of every stored tensor at most; the embedding and head are chosen too")
    m.add_argument("--mix-candidates", default=None, metavar="TAGS",
                   help=f"formats a tensor may take, comma-separated (default: {','.join(MIX_CANDIDATES)})")
    m.add_argument("--mix-damage", choices=["relative", "absolute"], default=None,
                   help="a tensor's damage: its output error over its output energy, or the error itself "
                        "(default: relative)")
    add_dataclass_args(p.add_argument_group("rotation (before any method)"), RotationConfig)
    add_dataclass_args(p.add_argument_group("block-wise reconstruction (after the method; calibrated)"), BlockTuneConfig)
    add_dataclass_args(p.add_argument_group("storage"), StorageConfig, prefix="storage_")
    c = p.add_argument_group("calibration (calibrated methods)")
    add_dataclass_args(c, CalibConfig)
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the blocks checkpointed in OUT.resume/")
    c.add_argument("--profile", default=None, metavar="PATH",
                   help="write seconds and FLOPs per block and stage, with the machine's fp32 GEMM rate, to PATH "
                        "(JSON) and a table beside it (.md)")


def _add_device_arg(p) -> None:
    p.add_argument("--device", default="auto",
                   help="compute device: auto (a GPU when there is one), cpu, cuda, cuda:N (default: auto)")


def _add_verify_arg(p) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load a lowbit checkpoint without comparing its files with the sizes and sha256 in its "
                        "lowbit.manifest.json (also loads one saved without a manifest); the checks of every layer's "
                        "spec against its tensors and of finite scales still run")


def _device(args):
    from ..utils import resolve_device

    return resolve_device(getattr(args, "device", "auto"))


def recipe_from_args(args):
    """The recipe of the flags given (every other setting at its default); another method's flag is an error."""
    from ..quantize import recipe_from_options, recipe_option_names

    given = {k: getattr(args, k) for k in sorted(recipe_option_names()) if getattr(args, k, None) is not None}
    return recipe_from_options(args.method, given)


def eval_from_args(args) -> EvalConfig:
    from ..eval.tasks import resolve_tasks
    from ..eval.zeroshot import parse_limit

    return EvalConfig(ppl=tuple(args.ppl), seqlen=args.seqlen, windows=args.windows,
                      tasks=tuple(resolve_tasks(args.tasks)) if args.tasks else (), limit=parse_limit(args.limit))


def cmd_list(args):
    from rich.console import Console
    from rich.table import Table

    from ..data.texts import list_texts
    from ..models.zoo import list_models

    t = Table("model", "description")
    for m in list_models():
        t.add_row(m.name, m.description)
    Console().print(t)
    t = Table("text", "description")
    for s in list_texts():
        t.add_row(s.name, s.description)
    Console().print(t)


def cmd_pull(args):
    from ..data.texts import list_texts, pull_text
    from ..models.zoo import list_models, pull_model

    models = {m.name for m in list_models()}
    texts = {s.name for s in list_texts()}
    for name in args.names:
        if name in models:
            print(pull_model(name))
        elif name in texts:
            print(pull_text(name))
        else:
            raise LowbitError(f"{name!r} is neither a zoo model ({', '.join(sorted(models))}) nor a zoo text ({', '.join(sorted(texts))})")


def cmd_quantize(args):
    from ..api import quantize_named

    recipe = recipe_from_args(args)
    model, _, summary = quantize_named(args.model, recipe, device=args.device, out=args.out, resume=args.resume,
                                       progress=not args.quiet, profile=args.profile)
    log.info("saved %s (%.1fs)", args.out, summary["quant_time_s"])
    _print_bpw(model, recipe.storage.dtype, brief=True)


def _show_and_record(args, res: dict) -> dict:
    from rich.console import Console

    Console().print(f"[bold]{res['model']}[/] {res['method']} {res['tag']}: bpw blocks {res['bpw']['blocks']:.3f} "
                    f"all-in {res['bpw']['all_in']:.3f}; "
                    + ", ".join(f"ppl {k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in res["ppl"].items()))
    for corpus, why in res.get("nonfinite", {}).items():
        log.warning("ppl %s: %s", corpus, why)
    if args.record:
        from ..eval.record import write_result
        from ..report.tables import write_table

        path = write_result(res, args.results_dir)
        write_table(args.results_dir)
        log.info("recorded %s", path)
    return res


def _check_results_dir(args) -> None:
    if args.record:
        from ..eval.record import check_results_dir

        check_results_dir(args.results_dir)


def cmd_eval(args):
    from ..api import evaluate

    _check_results_dir(args)
    return _show_and_record(args, evaluate(args.model, eval_from_args(args), model_name=args.model_name,
                                           device=args.device, progress=not args.quiet, verify=args.verify))


def cmd_run(args):
    """Quantize in memory, evaluate and record (no checkpoint unless --out)."""
    from ..api import run

    if args.method == "fp32":
        from ..quantize import recipe_option_names

        given = sorted(k for k in recipe_option_names() if getattr(args, k, None) is not None)
        if given:
            raise ConfigError(f"--method fp32 is the float reference and takes no quantization settings; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in given)}")
    recipe = None if args.method == "fp32" else recipe_from_args(args)
    _check_results_dir(args)
    return _show_and_record(args, run(args.model, recipe, eval_from_args(args), model_name=args.model_name,
                                      device=args.device, out=args.out, resume=getattr(args, "resume", False),
                                      progress=not args.quiet, verify=args.verify, profile=args.profile))


def _print_bpw(model, storage: str, brief: bool = False):
    from rich.console import Console
    from rich.table import Table

    from ..nn.bpw import bpw_report

    rep = bpw_report(model, storage)
    con = Console()
    if not brief:
        items = sorted({k for v in rep["layers"].values() for k in v["items"]})
        t = Table("layer", "weights", *[f"{k} (bits)" for k in items], "bpw")
        for name, v in rep["layers"].items():
            t.add_row(name, f"{v['weights']:,}", *[f"{v['items'].get(k, 0):,}" for k in items], f"{v['bpw']:.4f}")
        con.print(t)
    con.print(f"bpw blocks: [bold]{rep['blocks']:.4f}[/] ({rep['blocks_bits']:,} bits / {rep['blocks_weights']:,} weights); "
              f"all-in: [bold]{rep['all_in']:.4f}[/] ({rep['total_bits']:,} bits / {rep['n_params']:,} params)")


def _describe_spec(spec: dict) -> str:
    """A quantized module's storage in words, from its ``lowbit.json`` spec."""
    codec = spec.get("codec")
    if "format" in spec:
        return FormatConfig(**spec["format"]).tag()
    if codec == "vq":
        return (f"vq v{spec['v']} k{spec['k']}" + (f" + residual k{spec['k_res']}" if spec.get("k_res") else "")
                + (" + outliers" if spec.get("n_outlier") else ""))
    if codec == "dgq_linear":
        return f"dgq w4a8 g{spec.get('group_size')} (int8 group scales, dynamic activations)"
    if codec == "act_linear":
        return (f"w{spec['w_bits']}a{spec['a_bits']} {'dynamic' if spec.get('dynamic') else 'static'}"
                + (" flattened" if spec.get("flatten") else ""))
    return str(codec)


def cmd_info(args):
    from ..api import load
    from ..io import read_meta

    meta = read_meta(args.dir)
    model = load(args.dir, verify=args.verify)
    recipe = meta.get("summary", {}).get("recipe", {})
    print(f"lowbit checkpoint {args.dir}: format_version {meta['format_version']}, source {meta.get('source_model')}, "
          f"method {recipe.get('method')}")
    groups: dict[tuple[str, str], list[str]] = {}   # what is stored is what the module specs say, not the recipe
    for name, entry in meta["modules"].items():
        groups.setdefault((entry.get("type", "?"), _describe_spec(entry.get("spec", {}))), []).append(name)
    for (kind, desc), names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        print(f"  {len(names):4d} {kind} {desc}: {where}")
    _print_bpw(model, meta.get("storage_dtype", "float16"))


def cmd_generate(args):
    import torch

    from ..api import load_model

    model, tok = load_model(args.model, _device(args), verify=args.verify)
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").to(model.device)
    n = ids["input_ids"].shape[1]
    if n == 0:
        raise ConfigError("the prompt is empty after tokenization (this tokenizer adds no BOS); pass some text")
    from ..models.arch import context_length

    ctx = context_length(model)
    if ctx is not None and n >= ctx:
        raise ConfigError(f"the prompt has {n} tokens, the model's whole context is {ctx}; use a shorter prompt")
    if ctx is not None and n + args.max_new_tokens > ctx:
        raise ConfigError(f"the prompt ({n} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the model's "
                          f"context of {ctx} tokens; use --max-new-tokens {max(ctx - n, 0)} or less, or a shorter prompt")
    torch.manual_seed(args.seed)
    from ..kernels import use_kernel_activations
    from ..runtime import LeanDecoder, lean_supported

    if args.kernel_act and model.device.type != "cpu":
        log.warning("--kernel-act sets the input precision of the CPU kernels; on %s the quantized layers run "
                    "torch's own matmuls, so it has no effect here (add --device cpu to use it)", model.device)
    why = lean_supported(model) if args.loop == "lean" else "--loop hf"
    with use_kernel_activations(args.kernel_act):
        if why is None:
            eos = model.generation_config.eos_token_id
            out = LeanDecoder(model, max_len=n + args.max_new_tokens).generate(
                ids["input_ids"], args.max_new_tokens, eos_token_id=eos, temperature=args.temperature,
                top_k=args.top_k, generator=torch.Generator(model.device).manual_seed(args.seed))
        else:
            if args.loop == "lean":
                log.info("lean decode loop not used (%s); using transformers' generate", why)
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                     temperature=args.temperature if args.temperature > 0 else None, top_p=None,
                                     top_k=args.top_k)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def cmd_distill(args):
    from ..api import check_inputs, load_model
    from ..distill.train import DistillConfig, distill
    from ..quantize import QuantRecipe

    fmt = dataclass_from_args(FormatConfig, args)
    fmt.make()  # validate before loading a model
    cfg = dataclass_from_args(DistillConfig, args)
    # the student is saved like an RTN checkpoint of its format: that is the size to find room for
    check_inputs(texts=(cfg.teacher_source,), out=args.out, model=args.model, recipe=QuantRecipe(fmt=fmt))
    model, tok = load_model(args.model, _device(args))
    _, summary = distill(model, tok, fmt, cfg, args.out, source_model=args.model, progress=not args.quiet)
    log.info("saved %s (final loss %.4f, %.0fs)", args.out, summary["distill"]["final_loss"], summary["quant_time_s"])


def cmd_export(args):
    from ..api import export

    options = {k: v for k, v in (("regroup", args.regroup), ("checkpoint_format", args.checkpoint_format),
                                 ("allow_f16", args.allow_f16)) if v}
    print(export(args.ckpt, args.to or args.dequantize, args.out, verify=args.verify, **options))


def cmd_bench_kernels(args):
    from ..bench.kernels import BENCH_FORMATS, GEMM_BATCHES, SHAPES, bench_kernels, write_kernels_report

    shapes = args.shapes or (SHAPES[:4] if args.quick else SHAPES)
    batches = GEMM_BATCHES if args.batches is None else tuple(args.batches)
    runs = [bench_kernels(args.formats or BENCH_FORMATS, shapes, batches=batches, repeats=args.repeats,
                          threads=t, progress=not args.quiet)
            for t in (args.threads or [None])]
    write_kernels_report(runs, Path(args.json), Path(args.md))
    log.info("wrote %s and %s", args.json, args.md)


def cmd_bench_decode(args):
    from ..bench.decode import bench_decode, write_decode_report

    if args.ckpt_head.lower() != "none":
        from ..config import parse_format_tag

        parse_format_tag(args.ckpt_head, default_group=128)  # a bad --ckpt-head fails before any timing
    res = bench_decode(args.models, args.configs, new_tokens=args.new_tokens, repeats=args.repeats,
                       threads=args.threads, llama_cpp=args.llama_cpp, progress=not args.quiet,
                       llama_cpp_bin=args.llama_cpp_bin,
                       **({"llama_quants": args.llama_quants} if args.llama_quants else {}),
                       ckpt_head=None if args.ckpt_head.lower() == "none" else args.ckpt_head)
    write_decode_report(res, Path(args.json), Path(args.md))
    log.info("wrote %s and %s", args.json, args.md)


def cmd_report(args):
    from ..report.pages import write_report

    for path in write_report(args.results_dir).values():
        print(path)


def cmd_bench(args):
    from ..bench.grid import duration, load_recipe, plan_summary, run_bench

    plan = run_bench(load_recipe(args.recipe), force=args.force, dry_run=args.dry_run, quiet=args.quiet,
                     jobs=args.jobs, device=args.device, log_dir=args.log_dir)
    for p in plan:
        line = f"{p['status']:8s} lowbit {' '.join(p['argv'])}"
        if p.get("est_s") is not None:
            line += f"  # ~{duration(p['est_s'])}, median of {p['est_n']} earlier run(s)"
        print(line)
    summary = plan_summary(plan, args.jobs)
    if summary:
        print(summary, file=sys.stderr)


# ---------------------------------------------------------------- parser

def _add_eval_args(p):
    ev = EvalConfig()  # the defaults
    p.add_argument("--ppl", nargs="+", default=list(ev.ppl), metavar="CORPUS",
                   help=f"corpora for perplexity (default: {' '.join(ev.ppl)})")
    p.add_argument("--seqlen", type=int_at_least(2), default=ev.seqlen, help=f"tokens per window (default: {ev.seqlen})")
    p.add_argument("--windows", default=ev.windows, type=windows_arg,
                   help=f"number of windows, or 'all' (default: {ev.windows})")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True, help="write a results JSON (default: yes)")
    p.add_argument("--results-dir", default="docs/results", help="where results JSON go (default: docs/results)")
    p.add_argument("--model-name", default=None, help="model name in results (default: the model argument's name)")
    from ..eval.zeroshot import limit_arg, tasks_arg

    _add_device_arg(p)
    _add_verify_arg(p)
    p.add_argument("--tasks", default=None, type=tasks_arg, metavar="T1,T2|all", help="zero-shot tasks, comma-separated, or 'all' (default: none)")
    p.add_argument("--limit", default=str(ev.limit), type=limit_arg, metavar="N|full",
                   help=f"items per zero-shot task, seeded subset (default: {ev.limit})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Extreme low-bit quantization of LLMs.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="list zoo models and texts")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("pull", help="fetch and cache zoo models or texts")
    s.add_argument("names", nargs="+")
    s.set_defaults(fn=cmd_pull)

    s = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    s.add_argument("model", help="zoo name, HF folder, GGUF file or hub id")
    _add_quant_args(s)
    _add_device_arg(s)
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity of a model or checkpoint; records a results JSON")
    s.add_argument("model", help="lowbit checkpoint, zoo name, HF folder, GGUF file or hub id")
    _add_eval_args(s)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("run", help="quantize in memory, evaluate, record (method fp32 = the float reference)")
    s.add_argument("model")
    _add_quant_args(s)
    _add_eval_args(s)
    s.add_argument("--out", default=None, help="also save the checkpoint here")
    s.set_defaults(fn=cmd_run)

    from ..distill.train import DistillConfig

    s = sub.add_parser("distill", help="BitDistiller: quantization-aware self-distillation, saves a packed checkpoint")
    s.add_argument("model", help="zoo name, HF folder or hub id (the float teacher)")
    add_dataclass_args(s, FormatConfig)
    add_dataclass_args(s, DistillConfig)
    s.add_argument("--out", required=True, help="checkpoint folder to write (work files go to OUT.distill/)")
    _add_device_arg(s)
    s.set_defaults(fn=cmd_distill)

    s = sub.add_parser("info", help="itemised bits-per-weight of a checkpoint")
    s.add_argument("dir")
    _add_verify_arg(s)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="generate text with a model or checkpoint")
    s.add_argument("model")
    s.add_argument("prompt")
    s.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    s.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int_at_least(1), default=None, help="sample from the k most likely tokens (with --temperature)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--loop", choices=["lean", "hf"], default="lean",
                   help="decode loop: lowbit's lean loop (static cache, fused ops; default, where the model fits it) "
                        "or transformers' generate")
    s.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False, help="wrap the prompt in the chat template")
    s.add_argument("--kernel-act", choices=["fp32", "q8"], default=None,
                   help="input precision of the CPU GEMV kernels: fp32 (exact, the default) or q8 (int8 per block "
                        "of 32, faster for INT2-4 and the FP/NF table formats; docs/kernels.md); default: $LOWBIT_KERNEL_ACT or fp32")
    _add_device_arg(s)
    _add_verify_arg(s)
    s.set_defaults(fn=cmd_generate)

    from ..export import target_names

    s = sub.add_parser("export", help="write a checkpoint for a serving engine (compressed-tensors, gptq, gguf, vptq) "
                                      "or as a plain float16 folder; exact or refused (docs/export.md)")
    s.add_argument("ckpt", help="lowbit checkpoint folder")
    to = s.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", metavar="TARGET", help=f"one of: {', '.join(t for t in target_names() if t != 'f16')}")
    to.add_argument("--dequantize", choices=["f16"], help="a plain transformers folder of float16 weights, from any "
                                                           "checkpoint")
    s.add_argument("--out", required=True, help="folder to write, new or empty (a file for gguf)")
    s.add_argument("--regroup", action="store_true",
                   help="compressed-tensors, gptq: when the group size does not divide a width (576 at g128), store "
                        "every layer with groups of the largest size dividing all of them, scales repeated (exact)")
    s.add_argument("--allow-f16", action="store_true",
                   help="gguf: store a quantized tensor with no exact block type as F16 instead of refusing it")
    s.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default=None,
                   help="gptq: zero points as v1 (z - 1, what every reader takes; the default) or v2 (z)")
    _add_verify_arg(s)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("bench-kernels", help="benchmark the CPU kernels (GEMV bandwidth, GEMM throughput)")
    s.add_argument("--formats", nargs="+", default=None, metavar="TAG", help="format tags; <tag>@q8 runs the layer with int8 activations (default: a fixed set)")
    s.add_argument("--threads", nargs="+", type=int_at_least(1), default=None, help="thread counts to run (default: torch's)")
    s.add_argument("--repeats", type=int_at_least(1), default=30, help="timed repeats per measurement (medians; default: 30)")
    s.add_argument("--quick", action="store_true", help="smollm2 shapes only")
    s.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="OUTxIN",
                   help="layer shapes to run, e.g. 4096x11008 (default: the zoo models' linears)")
    s.add_argument("--batches", nargs="*", type=int_at_least(1), default=None, metavar="B",
                   help="GEMM batch sizes (default: 16 64 512; none: GEMV only)")
    s.add_argument("--json", default="docs/results/kernels.json")
    s.add_argument("--md", default="docs/kernels.md")
    s.set_defaults(fn=cmd_bench_kernels)

    s = sub.add_parser("bench-decode", help="end-to-end greedy decode tokens/s (torch fp32/bf16, lowbit, llama.cpp)")
    s.add_argument("--models", nargs="+", default=["smollm2-135m"], help="zoo models (default: smollm2-135m)")
    s.add_argument("--configs", nargs="+", default=None, metavar="NAME",
                   help="fp32, bf16, format tags such as int4-g128, or ckpt=DIR; suffixes @hf (transformers' "
                        "generate), @ref (no kernels), @q8 (int8-input kernels) (default: a fixed set)")
    s.add_argument("--new-tokens", type=int_at_least(1), default=128)
    s.add_argument("--repeats", type=int_at_least(1), default=3, help="generations per config (medians; default: 3)")
    s.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's)")
    s.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                   help="also run llama.cpp via llama-cpp-python when installed (default: yes)")
    s.add_argument("--llama-cpp-bin", default=None, metavar="DIR",
                   help="folder with llama.cpp's llama-quantize and llama-bench: llama.cpp rows from them instead "
                        "of llama-cpp-python")
    s.add_argument("--llama-quants", nargs="+", default=None, metavar="Q",
                   help="llama.cpp files to time: F32, Q8_0, Q4_K_M, Q3_K_M, Q2_K (default: F32 Q8_0 Q4_K_M Q2_K)")
    s.add_argument("--ckpt-head", default="int4-g128", metavar="FMT|none",
                   help="ckpt= rows: RTN-quantize a float LM head to this format, as the format rows do "
                        "(default: int4-g128; none: keep it float)")
    s.add_argument("--json", default="docs/results/decode.json")
    s.add_argument("--md", default="docs/decode.md")
    s.set_defaults(fn=cmd_bench_decode)

    s = sub.add_parser("report", help="rebuild docs/results.md, docs/leaderboard.md and docs/plots from the results JSON files")
    s.add_argument("--results-dir", default="docs/results")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("bench", help="run a grid (models x methods x configs) from a YAML recipe, reusing cached results")
    s.add_argument("recipe", help="YAML recipe, e.g. recipes/rtn_grid.yaml")
    s.add_argument("--force", action="store_true", help="rerun grid points whose results JSON already exists")
    s.add_argument("--dry-run", action="store_true", help="print the plan (cached / planned) without running")
    s.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="grid points run at once, each in its own process (default: 1); on the CPU each gets "
                        "cores/jobs threads unless OMP_NUM_THREADS is set")
    s.add_argument("--device", default=None, help="passed to every run as --device (default: each run's own, auto)")
    s.add_argument("--log-dir", default="out/bench-logs", help="with --jobs > 1: one log file per run here")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars ("Loading weights")
    try:
        args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
