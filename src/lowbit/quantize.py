"""Quantize a model in place: the entry point that methods, CLI and API share."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .config import BlockTuneConfig, CalibConfig, FormatConfig, MixConfig, RotationConfig, StorageConfig
from .errors import CheckpointError, ConfigError
from .methods import get_method
from .models.arch import ArchSpec, arch_for, get_module, set_module, untie_word_embeddings
from .nn import QuantizedEmbedding, scalar_spec, to_module
from .nn.bpw import count_params
from .utils import peak_memory_gb

log = logging.getLogger(__name__)

__all__ = ["QuantRecipe", "check_block_tune", "check_finite_weights", "estimate_output_bytes", "finalize_storage", "quantize_embed_and_head", "quantize_model", "recipe_from_options",
           "recipe_option_names", "recipe_option_types"]


@dataclass(frozen=True)
class QuantRecipe:
    """Everything that defines a quantized model (recorded in checkpoints and results)."""

    method: str = "rtn"
    fmt: FormatConfig = field(default_factory=FormatConfig)
    method_config: dict = field(default_factory=dict)
    embed: FormatConfig | None = None   # quantize the token embedding with this format
    head: FormatConfig | None = None    # quantize the LM head with this format
    storage: StorageConfig = field(default_factory=StorageConfig)
    calib: dict | None = None           # calibration source/size/seed, for calibrated methods
    rotation: RotationConfig = field(default_factory=RotationConfig)   # rotate the float model first
    #: per-tensor formats, ``{path: FormatConfig}``: block linears (``model.layers.0.mlp.down_proj``) and the
    #: embedding and head paths of the architecture row; a block linear not named takes ``fmt``, an embedding or
    #: head not named ``embed``/``head``. A size budget (``mix``) fills it with its plan when the model is quantized.
    layers: dict = field(default_factory=dict)
    mix: MixConfig | None = None        # a size budget: choose a format per tensor (docs/mixed.md)
    #: block-wise reconstruction after the solver (docs/methods.md)
    block_tune: BlockTuneConfig = field(default_factory=BlockTuneConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key, empty in (("rotation", RotationConfig()), ("layers", {}), ("mix", None),
                           ("block_tune", BlockTuneConfig())):
            if getattr(self, key) == empty:
                del d[key]   # recipes without them keep the dict they had before they existed (results caches)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        from .config import from_dict

        d = dict(d)
        d["fmt"] = from_dict(FormatConfig, d.get("fmt"))
        d["storage"] = from_dict(StorageConfig, d.get("storage"))
        d["rotation"] = from_dict(RotationConfig, d.get("rotation"))   # recipes before rotation existed: none
        for k in ("embed", "head"):
            d[k] = from_dict(FormatConfig, d[k]) if d.get(k) else None
        d["layers"] = {name: from_dict(FormatConfig, f) for name, f in (d.get("layers") or {}).items()}
        d["mix"] = from_dict(MixConfig, d["mix"]) if d.get("mix") else None
        d["block_tune"] = from_dict(BlockTuneConfig, d.get("block_tune"))   # recipes before it existed: none
        return cls(**d)

    def tag(self) -> str:
        """Short name for results files: the format tag (or, for methods without a scalar format, the first
        non-default setting; a size budget's tag, ``mix=3.5bpw``, instead), then the method settings that differ
        from the defaults, then embed/head formats, then the rotation and block-tuning settings that differ from
        the defaults (``rotate=hadamard``, ``block_tune=lwc``), then ``layers=N`` for per-layer formats given by hand.
        """
        from .methods import get_method

        method = get_method(self.method)
        defaults = asdict(method.config())
        extra = [f"{k}={v}" for k, v in sorted(self.method_config.items()) if defaults.get(k) != v]
        tag = self.fmt.tag() if method.uses_format else (extra.pop(0) if extra else "default")
        if self.mix is not None:
            tag = self.mix.tag()
        if self.embed:
            extra.append(f"embed={self.embed.tag()}")
        if self.head:
            extra.append(f"head={self.head.tag()}")
        for stage in (self.rotation, self.block_tune):
            extra += [f"{k}={v}" for k, v in asdict(stage).items() if getattr(type(stage), k) != v]
        if self.layers and self.mix is None:
            extra.append(f"layers={len(self.layers)}")
        return "-".join([tag] + extra)


def quantize_embed_and_head(model: nn.Module, arch: ArchSpec, recipe: QuantRecipe) -> None:
    """RTN the embedding and head at their formats (``recipe.layers`` by path, else ``embed``/``head``)."""
    from .formats import quantize_rtn

    tied = getattr(model.get_output_embeddings(), "weight", None) is model.get_input_embeddings().weight
    embed, head_fmt = recipe.layers.get(arch.embed, recipe.embed), recipe.layers.get(arch.head, recipe.head)
    if head_fmt is not None:
        head = get_module(model, arch.head)
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"the head is already quantized by the method ({type(head).__name__}, e.g. its "
                              f"int8_head option): drop --head {head_fmt.tag()} or that option")
        qw = quantize_rtn(head.weight, head_fmt.make())
        set_module(model, arch.head, to_module(head, qw))
    if embed is not None:
        emb = get_module(model, arch.embed)
        qw = quantize_rtn(emb.weight, embed.make())
        spec = scalar_spec(qw.fmt, emb.weight.shape[0], emb.weight.shape[1])
        scale = getattr(emb, "embed_scale", None)
        scale = float(scale) if scale is not None else None
        q = QuantizedEmbedding.from_quantized(qw, spec, getattr(emb, "padding_idx", None), scale).to(emb.weight.device)
        set_module(model, arch.embed, q)
    if tied and (head_fmt is not None or embed is not None):
        untie_word_embeddings(model)   # they are now stored separately


def finalize_storage(model: nn.Module, storage: StorageConfig) -> None:
    """Round every float tensor that is not quantized to the storage dtype.

    Compute stays in float32, but values become exactly what the checkpoint
    stores, so logits before saving equal logits after loading.
    """
    dt = getattr(torch, storage.dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dt).to(p.dtype)


def _check_float_blocks(model: nn.Module, arch: ArchSpec) -> None:
    """A clear error when the decoder blocks are already quantized (e.g. a lowbit checkpoint was passed)."""
    for i, block in enumerate(get_module(model, arch.blocks)):
        for name in arch.linears:
            lin = get_module(block, name)
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"{arch.blocks}.{i}.{name} is already quantized ({type(lin).__name__}): this "
                                  "model is a lowbit checkpoint. Quantize the float model it was made from "
                                  "instead (`lowbit info CKPT` names it).")


def check_finite_weights(model: nn.Module) -> None:
    """CheckpointError naming the first parameter that holds NaN or Inf, with its counts.

    A non-finite weight makes every scale of its group non-finite and the quantized model silently useless;
    such a model is damaged at its source, so there is no flag to go on. One ``isfinite`` pass per tensor.
    """
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
            raise CheckpointError(f"cannot quantize: weight {name} {tuple(p.shape)} holds {nan} NaN and {inf} Inf "
                                  f"value(s) of {p.numel()}; the model's weights are damaged at their source "
                                  f"(re-download or re-convert the model)")


def quantize_model(model: nn.Module, recipe: QuantRecipe, calib_ids: torch.Tensor | None = None,
                   progress: bool = True, resume_dir=None, device=None, profile=None) -> dict:
    """Quantize ``model``'s decoder-block linears (and optionally embedding/head) in place.

    ``calib_ids``: ``(n, seqlen)`` token windows for calibrated methods.
    ``resume_dir``: checkpoint finished blocks there and continue from them (calibrated methods).
    ``device``: compute device for calibration (default: the model's).
    ``profile``: a :class:`lowbit.calib.profile.Profile` the layer-wise engine records its stages in; the fp32 GEMM
    rate of the machine is measured into it after quantizing (the stage totals go in the summary too).
    Returns a summary: quantization time, peak memory, recipe (with a size budget, the recipe with its plan in
    ``layers``, and the plan's totals as ``mix_plan``).
    A model with a NaN or Inf weight is refused (:func:`check_finite_weights`).
    """
    arch = arch_for(model)
    _check_float_blocks(model, arch)
    check_finite_weights(model)
    method = get_method(recipe.method)
    from .config import from_dict

    mcfg = from_dict(method.config, recipe.method_config)
    fmt = recipe.fmt.make()
    n_params = getattr(model, "lowbit_n_params", None) or count_params(model)   # before a rotation unties the head
    t0 = time.perf_counter()
    if method.needs and calib_ids is None:
        raise ConfigError(f"method {recipe.method!r} needs calibration data (it uses {', '.join(sorted(method.needs))})")
    tune = recipe.block_tune if recipe.block_tune.enabled else None
    if tune is not None:
        check_block_tune(recipe)
        if calib_ids is None:
            raise ConfigError("--block-tune tunes each block on calibration windows; pass calib_ids (the CLI samples "
                              "them from --calib)")
    rotation = None
    if recipe.rotation.rotate != "none":
        from .calib.rotate import rotate_model

        rotation = rotate_model(model, recipe.rotation.rotate_seed)
    method_result = None
    if method.prepare_model is not None:
        method_result = method.prepare_model(model, arch, calib_ids, fmt, mcfg, device)
    plan = None
    if recipe.mix is not None:
        recipe, plan = _plan_recipe(model, arch, recipe, calib_ids, n_params, progress, device)
    layer_fmts = _layer_formats(model, arch, recipe)
    tuned = None
    if method.stats_needed(mcfg) or tune is not None:
        from .calib.engine import run_layerwise

        tuned = run_layerwise(model, arch, method, fmt, mcfg, calib_ids, progress=progress, resume_dir=resume_dir,
                              device=device, layer_fmts=layer_fmts, block_tune=tune, profile=profile)
    else:
        from .calib.engine import quantize_block

        for i, block in enumerate(tqdm(get_module(model, arch.blocks), desc=f"{recipe.method} blocks",
                                       disable=not progress)):
            quantize_block(block, arch, method, fmt, mcfg, fmts=layer_fmts[i] if layer_fmts else None)
    if method.finish_model is not None:
        method.finish_model(model, arch, fmt, mcfg)
    quantize_embed_and_head(model, arch, recipe)
    finalize_storage(model, recipe.storage)
    summary = {
        "recipe": recipe.to_dict(),
        "quant_time_s": round(time.perf_counter() - t0, 2),
        "peak_mem_gb": peak_memory_gb(device),
        "lowbit_version": __version__,
    }
    if rotation is not None:
        summary["rotation"] = rotation   # seed, width, and whether the head was untied from the embedding
    if method_result is not None:
        summary["method_result"] = method_result
    if plan is not None:
        summary["mix_plan"] = plan
    if profile is not None:
        _finish_profile(profile, model, arch, recipe, calib_ids)
        summary["profile"] = profile.to_dict()["total"]
    if tune is not None:
        summary["block_tune"] = tuned   # per block: output MSE before and after tuning, and which result it kept
    model.lowbit_summary = summary
    return summary


def _finish_profile(profile, model: nn.Module, arch: ArchSpec, recipe: QuantRecipe, calib_ids) -> None:
    """What ran, and the fp32 GEMM rate at the shape of the engine's largest product (one batch of 8 windows times
    the widest block linear), measured now with the same threads."""
    from .calib.profile import gemm_rate

    block = get_module(model, arch.blocks)[0]
    ins = {n: get_module(block, n).in_features for n in arch.linears}
    outs = {n: get_module(block, n).out_features for n in arch.linears}
    widest = max(arch.linears, key=lambda n: ins[n] * outs[n])
    rows = (min(8, calib_ids.shape[0]) * calib_ids.shape[1]) if calib_ids is not None else 4096
    profile.meta.update({"method": recipe.method, "tag": recipe.tag(), "threads": torch.get_num_threads(),
                         "calib": list(calib_ids.shape) if calib_ids is not None else None})
    profile.gemm = gemm_rate(rows, ins[widest], outs[widest])


def check_block_tune(recipe: QuantRecipe) -> None:
    """ConfigError when ``recipe`` asks for block tuning that its method or formats cannot take: a method with its
    own storage (VQ) or a format other than int, fp and nf (the K-quant and block formats)."""
    from .calib.blocktune import check_tunable_format

    if not get_method(recipe.method).uses_format:
        raise ConfigError(f"--block-tune tunes the scalar formats' clipping, scales and weights; --method "
                          f"{recipe.method} has its own storage: drop --block-tune or choose rtn, gptq or awq")
    cands = recipe.mix.formats().values() if recipe.mix is not None else ()
    for f in (recipe.fmt, *recipe.layers.values(), *cands):
        check_tunable_format(f.make())


def _layer_formats(model: nn.Module, arch: ArchSpec, recipe: QuantRecipe) -> list[dict] | None:
    """Per block, ``{linear name: Format}`` of the linears ``recipe.layers`` names; None without any. A name that
    is no block linear, embedding or head of this model is a ConfigError."""
    if not recipe.layers:
        return None
    n_blocks = len(get_module(model, arch.blocks))
    paths = {f"{arch.blocks}.{i}.{name}": (i, name) for i in range(n_blocks) for name in arch.linears}
    unknown = sorted(set(recipe.layers) - set(paths) - {arch.embed, arch.head})
    if unknown:
        raise ConfigError(f"recipe layers name {', '.join(unknown[:5])}, which this {arch.name} model does not have; "
                          f"layers are block linears ({arch.blocks}.0.{arch.linears[0]}), {arch.embed} or {arch.head}")
    out: list[dict] = [{} for _ in range(n_blocks)]
    for path, f in recipe.layers.items():
        if path in paths:
            i, name = paths[path]
            out[i][name] = f.make()
    return out


def _plan_recipe(model: nn.Module, arch: ArchSpec, recipe: QuantRecipe, calib_ids, n_params: int, progress: bool,
                 device) -> tuple[QuantRecipe, dict]:
    """``recipe`` with its size budget's plan as ``layers`` (docs/mixed.md), and the plan's summary."""
    from .calib.sensitivity import sensitivity_scores
    from .mixed import KEEP, format_plan, plan_budget

    mix = recipe.mix
    if not get_method(recipe.method).uses_format:
        raise ConfigError(f"a size budget chooses a number format per tensor; --method {recipe.method} has no "
                          f"number format to choose")
    if calib_ids is None:
        raise ConfigError("a size budget (--target-bpw / --target-mb) scores every tensor on calibration windows; "
                          "pass calib_ids (the CLI samples them from --calib)")
    cands = mix.formats()
    eh = mix.counts_all and (recipe.embed is None or recipe.head is None)
    scores = sensitivity_scores(model, arch, {t: f.make() for t, f in cands.items()}, calib_ids, embed_head=eh,
                                progress=progress, device=device)
    plan = plan_budget(model, arch, mix, scores, recipe.storage, recipe.embed, recipe.head, n_params=n_params)
    layers = {path: cands[tag] for path, tag in plan.layers.items()}
    layers.update({path: cands[tag] for path, tag in ((arch.embed, plan.embed), (arch.head, plan.head))
                   if tag not in (None, KEEP)})
    log.info("%s: %.4f %s (target %g), predicted damage %.6g, tensors per format %s, embedding %s, head %s\n%s",
             mix.tag(), plan.achieved, plan.unit, plan.target, plan.damage, plan.counts, plan.embed or "as given",
             plan.head or "as given", format_plan(layers, arch.blocks))
    scores_file = scores["path"] and scores["path"].rsplit("/", 1)[-1]   # the cache file's name, not this machine's path
    return replace(recipe, layers=layers), {**plan.summary(), "scores": scores_file}

def estimate_output_bytes(recipe: QuantRecipe, n_params: int, config: dict) -> tuple[int, str]:
    """``(bytes, how)``: about how much disk a ``quantize --out`` of a model with ``n_params`` parameters and this
    ``config`` (its config.json) takes under ``recipe``, for a free-space check before the model loads.

    The embedding (and an untied head, or a head a rotation unties) count at the storage width, or at their format when quantized; every
    other parameter at the format's bits plus one fp16 scale and zero per group (methods with their own
    storage, VPTQ or W8A8, count at the format's bits too: this is an estimate, not a bound). Calibrated methods
    add ``OUT.resume/``, which exists until the checkpoint is saved: the quantized blocks again and two copies
    of one block's fp32 inputs (nsamples x seqlen x hidden). Plus 10%.
    """
    text = config.get("text_config") or config
    vocab, hidden = text.get("vocab_size") or 0, text.get("hidden_size") or 0
    emb = vocab * (text.get("word_embed_proj_dim") or hidden)
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    blocks = max(n_params - emb - (0 if tied else vocab * hidden), 0)
    head = 0 if tied and recipe.rotation.rotate == "none" else vocab * hidden   # a rotation unties the head
    storage = torch.finfo(getattr(torch, recipe.storage.dtype)).bits

    def bits(fmt: FormatConfig | None, default: float) -> float:
        return default if fmt is None else fmt.bits + (32 / fmt.group_size if fmt.group_size > 0 else 0)

    widest = recipe.fmt if recipe.mix is None else max(recipe.mix.formats().values(), key=lambda f: bits(f, 0))
    block_bytes = blocks * bits(widest, storage) / 8   # a budget: its widest candidate, an upper bound
    total = block_bytes + emb * bits(recipe.embed, storage) / 8 + head * bits(recipe.head, storage) / 8
    how = f"{n_params / 1e6:.1f}M parameters at {recipe.fmt.tag()}, embedding and head at {recipe.storage.dtype}"
    if recipe.calib is not None:
        total += block_bytes + 2 * recipe.calib["nsamples"] * recipe.calib["seqlen"] * hidden * 4
        how += ", with the resume folder"
    return int(total * 1.1), how


def _options_of(cls) -> dict[str, tuple[str, object]]:
    """``{option: (field, type)}`` of a config dataclass; an option is the field's CLI flag without dashes."""
    import typing
    from dataclasses import fields

    hints = typing.get_type_hints(cls)
    return {f.metadata.get("flag", f.name): (f.name, hints[f.name]) for f in fields(cls) if f.init}


def _check_type(key: str, value, typ) -> None:
    want = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(typ)
    if want is None:
        return
    if not isinstance(value, want) or (typ is not bool and isinstance(value, bool)):
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[typ]
        raise ConfigError(f"--{key.replace('_', '-')}: expected {what}, got {value!r}")


#: size-budget options (:class:`MixConfig`), ``{option: type}``; ``mix_candidates`` is a comma-separated list of tags
MIX_OPTIONS = {"target_bpw": float, "target_mb": float, "all_in": bool, "mix_candidates": str, "mix_damage": str}


def _mix_config(options: dict) -> MixConfig | None:
    """The size budget the options ask for (None without one)."""
    given = {k: v for k, v in options.items() if k in MIX_OPTIONS}
    if not given:
        return None
    for key, value in given.items():
        _check_type(key, value, MIX_OPTIONS[key])
    kw = {{"mix_candidates": "candidates", "mix_damage": "damage"}.get(k, k): v for k, v in given.items()}
    if "candidates" in kw:
        kw["candidates"] = tuple(t.strip() for t in kw["candidates"].split(",") if t.strip())
    return MixConfig(**kw)


def recipe_option_types() -> dict[str, object]:
    """``{option: type}`` of every option :func:`recipe_from_options` knows, over all methods (the CLI adds one
    flag for each)."""
    from .methods import get_method, method_names

    tables = [_options_of(FormatConfig), _options_of(CalibConfig), _options_of(RotationConfig),
              _options_of(BlockTuneConfig),
              {"storage_" + k: v for k, v in _options_of(StorageConfig).items()},
              *(_options_of(get_method(m).config) for m in method_names())]
    types = {"embed": str, "head": str, **MIX_OPTIONS}
    for table in tables:
        for key, (_, typ) in table.items():
            types.setdefault(key, typ)
    return types


def recipe_option_names() -> set[str]:
    """Every option :func:`recipe_from_options` knows (:func:`recipe_option_types`)."""
    return set(recipe_option_types())


def recipe_from_options(method: str, options: dict) -> QuantRecipe:
    """The recipe of ``lowbit run --method METHOD`` with ``options``: flags without dashes (``group_size: 64``,
    ``act_order: true``, ``nsamples: 64``, ``storage_dtype``, ``embed: int8``), every other setting at its
    dataclass default. The CLI and ``lowbit bench`` both build recipes here, so a grid point and the same
    command line give the same results file.

    A size budget (``target_bpw`` or ``target_mb``, with ``all_in``, ``mix_candidates``, ``mix_damage``) makes a
    mixed-precision recipe; it scores tensors on calibration windows, so it takes the calibration settings even
    for a data-free method.

    A setting of another method (``--method rtn --act-order``), a calibration setting for a method that uses
    no data (and no budget), an unknown key or a value of the wrong type is a ConfigError naming the fix.
    """
    from .config import format_fields, parse_format_tag
    from .methods import get_method, method_names

    m = get_method(method)
    own, fmt, calib = _options_of(m.config), _options_of(FormatConfig), _options_of(CalibConfig)
    rotation, tuning = _options_of(RotationConfig), _options_of(BlockTuneConfig)
    storage = {"storage_" + k: v for k, v in _options_of(StorageConfig).items()}
    owners: dict[str, list[str]] = {}
    for name in method_names():
        for k in _options_of(get_method(name).config):
            owners.setdefault(k, []).append(name)
    kw: dict[str, dict] = {"own": {}, "fmt": {}, "calib": {}, "storage": {}, "rotation": {}, "block_tune": {}}
    tags = {}
    mix = _mix_config(options)
    if mix is not None and not m.uses_format:
        raise ConfigError(f"--target-bpw/--target-mb choose a number format per tensor; --method {method} has none")
    tunes = options.get("block_tune", BlockTuneConfig.block_tune) != "none"   # block tuning runs on calibration data
    uses_calib = bool(m.needs) or mix is not None or tunes
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key in MIX_OPTIONS:
            continue
        if key in ("embed", "head"):
            _check_type(key, value, str)
            tags[key] = parse_format_tag(value)
            continue
        for part, table in (("own", own), ("fmt", fmt), ("calib", calib), ("storage", storage), ("rotation", rotation),
                            ("block_tune", tuning)):
            if key in table:
                break
        else:
            if key in owners:
                raise ConfigError(f"{flag} is a setting of {', '.join(owners[key])}, not of --method {method}; "
                                  f"drop it or choose that method")
            raise ConfigError(f"unknown setting {key!r}; settings are `lowbit run` flags without dashes, e.g. "
                              "bits, group_size, nsamples, act_order")
        if part == "calib" and not uses_calib:
            raise ConfigError(f"{flag} sets calibration data, but --method {method} uses none; drop it")
        field_name, typ = table[key]
        _check_type(key, value, typ)
        kw[part][field_name] = value
    recipe = QuantRecipe(
        method=method,
        fmt=FormatConfig(**format_fields(kw["fmt"])),
        method_config=asdict(m.config(**kw["own"])),
        embed=tags.get("embed"),
        head=tags.get("head"),
        storage=StorageConfig(**kw["storage"]),
        calib=asdict(CalibConfig(**kw["calib"])) if uses_calib else None,
        rotation=RotationConfig(**kw["rotation"]),
        mix=mix,
        block_tune=BlockTuneConfig(**kw["block_tune"]),
    )
    for f in (recipe.fmt, recipe.embed, recipe.head):
        if f is not None:
            f.make()  # a bad format fails here, before any model loads
    if recipe.block_tune.enabled:
        check_block_tune(recipe)
    return recipe
