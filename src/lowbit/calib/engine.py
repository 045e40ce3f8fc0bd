"""The one layer-wise calibration engine every calibrated method shares.

Flow (document of record for the order of operations):

1. **Capture.** Calibration windows run through the float model in batches.
   A pre-hook on every decoder block records the keyword arguments it is
   called with (attention mask, position embeddings; per block, because
   Gemma-3 alternates sliding and global attention) and the hidden states
   entering block 0. A private exception stops the forward early, so only
   the embedding runs for most batches. Activations live on ``offload``
   (CPU by default); one block at a time sits on the compute device.
2. **Per block** (progress bar over blocks):
   a. hooks on the first linear of each input group gather the statistics
      the method declares (``hessian``: H = 2·XᵀX/n in fp32, one per input
      group, so q/k/v share one and gate/up share one; ``act_absmean`` /
      ``act_absmax``: per-channel |x| mean and max; ``act_sqmean``: per-channel
      mean of x², llama.cpp's importance matrix); the block runs once on
      the calibration inputs with float weights;
   b. methods with a ``prepare_block`` step (AWQ scaling) transform the
      block's float weights first, using the group inputs they asked for;
   c. every linear is quantized from those statistics and swapped for a
      QuantizedLinear. Statistics are *not* recomputed between sub-layers
      (one stats pass per block); this halves calibration compute on a CPU
      at a small cost in quality versus "true sequential" GPTQ. Methods
      with a ``finish_block`` step (VPTQ fine-tuning) then tune the
      quantized block, given the float block's outputs from pass a. when
      they ask for ``block_outputs``. With ``block_tune`` (any method of
      the scalar formats), the block is then tuned against the float
      block's outputs (:mod:`lowbit.calib.blocktune`), keeping the result
      only when it lowers the block's output MSE;
   d. the quantized block re-runs on the calibration inputs, and its
      outputs become the next block's inputs.
3. **Resume.** With ``resume_dir``, each finished block's state and the next
   block's inputs are saved atomically (only the newest block keeps its
   inputs); a rerun continues from there and gives the same result as an
   uninterrupted run. The folder is tied to one run: method, format, settings,
   calibration windows and the model itself (:func:`model_fingerprint`, a hash
   of its config and weights); another run's folder is refused. Only the longest
   run of valid blocks 0..k-1 is restored: a missing or damaged block is redone
   with every block after it, and when block k-1 no longer has its outputs the
   restored blocks run again to recompute them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import BlockTuneConfig
from ..errors import ConfigError, LowbitError
from ..models.arch import ArchSpec, InputGroup, get_module, set_module
from ..nn import to_module
from ..nn.registry import build_module, module_entries
from ..utils import atomic_dir
from .profile import Profile, block_flops, feedback_flops, hessian_flops

log = logging.getLogger(__name__)

__all__ = ["BlockData", "GroupStats", "run_layerwise", "capture_inputs", "run_block", "quantize_block",
           "CalibrationError", "clear_resume_dir", "model_fingerprint", "float_block_stats", "Profile"]


class CalibrationError(LowbitError):
    """Calibration activations or statistics are unusable (NaN/Inf, empty)."""


class _Stop(Exception):
    pass


@dataclass
class GroupStats:
    """Statistics of one input group (linears sharing an input), accumulated over calibration tokens."""

    hessian: torch.Tensor | None = None   # (in, in) fp32, 2·XᵀX/n
    absmean: torch.Tensor | None = None   # (in,)
    absmax: torch.Tensor | None = None    # (in,)
    sqmean: torch.Tensor | None = None    # (in,) mean of x^2 per channel
    n: int = 0
    #: weight of each window's first position in the Hessian (its rows count this many times; 1 = plain XᵀX).
    #: A method's config asks for it with a ``first_position_weight`` field (GPTQ: the attention-sink position)
    first_weight: float = 1.0
    inputs: list[torch.Tensor] = field(default_factory=list)  # kept only when a method asks ("inputs")
    #: what a method's ``prepare_block`` derives per group for its ``quantize_linear``, which gets this object
    extra: dict = field(default_factory=dict)

    def add(self, x: torch.Tensor, needs: frozenset) -> None:
        xh = None
        if "hessian" in needs and self.first_weight != 1.0 and x.dim() == 3:
            xh = x.detach().float().clone()
            xh[:, 0] *= self.first_weight ** 0.5
            xh = xh.reshape(-1, x.shape[-1])
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                "NaN/Inf in calibration activations: the model overflows on the calibration text "
                "(try float32, another --calib source, or check the model weights)"
            )
        m = x.shape[0]
        tot = self.n + m
        if "hessian" in needs:
            h = x.T @ x if xh is None else xh.T @ xh
            self.hessian = h * (2.0 / tot) if self.hessian is None else self.hessian * (self.n / tot) + h * (2.0 / tot)
        if "act_absmean" in needs or "act_absmax" in needs:
            a = x.abs()
            s = a.sum(0)
            self.absmean = s / tot if self.absmean is None else self.absmean * (self.n / tot) + s / tot
            mx = a.amax(0)
            self.absmax = mx if self.absmax is None else torch.maximum(self.absmax, mx)
        if "act_sqmean" in needs:
            q = (x * x).sum(0)
            self.sqmean = q / tot if self.sqmean is None else self.sqmean * (self.n / tot) + q / tot
        if "inputs" in needs:
            self.inputs.append(x.to("cpu"))
        self.n = tot

    def token_sample(self, n: int) -> torch.Tensor:
        """At most ``n`` recorded input tokens ``(<= n, in)``, strided evenly (every window seen, no seed to carry).

        Rows ``0, step, 2·step, ...`` of the recorded tokens in order, taken batch by batch (no copy of them all)."""
        step = max(1, sum(t.shape[0] for t in self.inputs) // max(1, n))
        rows, off = [], 0
        for t in self.inputs:
            rows.append(t[(-off) % step :: step])   # the batch's rows whose overall index is a multiple of step
            off += t.shape[0]
        return torch.cat(rows)[:n]

    def first_tokens(self, n: int) -> torch.Tensor:
        """The first ``n`` recorded input tokens ``(<= n, in)``, copying only the batches that hold them."""
        rows, got = [], 0
        for t in self.inputs:
            if got >= n:
                break
            rows.append(t[: n - got])
            got += rows[-1].shape[0]
        return torch.cat(rows)


@dataclass
class BlockData:
    """What a method's block-level step sees: the block, its inputs and call arguments."""

    block: nn.Module
    index: int
    inputs: list[torch.Tensor]          # per batch, (B, T, hidden), on offload device
    kwargs: dict                         # block call kwargs (on the compute device)
    device: torch.device


def _first_hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _clean_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        # the KV cache under both names transformers has used for it ("cache" since 5.24)
        if k in ("hidden_states", "past_key_values", "past_key_value", "cache", "use_cache", "output_attentions"):
            continue
        out[k] = v
    out["use_cache"] = False
    return out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, batch_size: int,
                   offload: torch.device, prof: Profile | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0 (per batch) and each block's call kwargs."""
    blocks = get_module(model, arch.blocks)
    n_blocks = len(blocks)
    inputs: list[torch.Tensor] = []
    block_kwargs: list[dict | None] = [None] * n_blocks
    state = {"batch": 0}

    def make_hook(i):
        def hook(mod, args, kwargs):
            if i == 0:
                inputs.append(_first_hidden(args, kwargs).detach().to(offload))
            if block_kwargs[i] is None:
                block_kwargs[i] = _clean_kwargs(kwargs)
            if state["batch"] > 0 or i == n_blocks - 1:
                raise _Stop
            return None

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    dev = next(model.parameters()).device
    prof = prof or Profile()
    try:
        with prof.stage("capture"):
            for s in range(0, calib_ids.shape[0], batch_size):
                state["batch"] = s
                try:
                    model(input_ids=calib_ids[s : s + batch_size].to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in block_kwargs):
        raise CalibrationError("could not capture the decoder blocks' arguments (the model skipped a block?)")
    return inputs, block_kwargs  # type: ignore[return-value]


def batch_kwargs(kwargs: dict, b: int) -> dict:
    """Kwargs captured on a full batch, cut to a (last, smaller) batch of ``b`` rows."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > b:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: torch.device,
              offload: torch.device, prof: Profile | None = None, index: int = -1, flops: float = 0.0
              ) -> list[torch.Tensor]:
    """Outputs of ``block`` for each input batch. ``prof``: time it as block ``index``'s ``forward`` stage (``flops``
    for the whole pass; the moves between ``offload`` and ``device`` as ``copies``)."""
    prof = prof or Profile()
    outs = []
    with prof.stage("forward", index, flops):
        for x in inputs:
            with prof.stage("copies", index):
                x = x.to(device)
            y = block(x, **batch_kwargs(kwargs, x.shape[0]))
            y = y[0] if isinstance(y, tuple) else y
            with prof.stage("copies", index):
                outs.append(y.to(offload))
    return outs


@torch.no_grad()
def collect_stats(block: nn.Module, groups: tuple[InputGroup, ...], inputs, kwargs, needs: frozenset,
                  device, offload, outputs: list | None = None, first_weight: float = 1.0,
                  prof: Profile | None = None, index: int = -1, flops: float = 0.0
                  ) -> dict[InputGroup, GroupStats]:
    """One pass of ``block`` over the inputs with hooks on each group's first linear.

    ``outputs``: if a list, the block's outputs of this pass are appended to it; if None, each batch stops as soon
    as the last group (``groups`` are in execution order) has its input: the rest of the block (the MLP's down
    projection) would only make outputs nobody reads. ``first_weight``: see :attr:`GroupStats.first_weight`.
    ``prof``, ``index``, ``flops``: see :func:`run_block` (``flops``: of the whole block; less what the early stop
    skips); the hooks' time is the ``stats`` stage.
    """
    prof = prof or Profile()
    stats = {g: GroupStats(first_weight=first_weight) for g in groups}
    stop = outputs is None

    def add(g, x):
        n = x.numel() // x.shape[-1]
        with prof.stage("stats", index, hessian_flops(n, x.shape[-1]) if "hessian" in needs else 0.0):
            stats[g].add(x, needs)
        if stop and g is groups[-1]:
            raise _Stop

    handles = []
    for g in groups:
        lin = get_module(block, g.linears[0])
        handles.append(lin.register_forward_pre_hook(lambda m, a, g=g: add(g, a[0])))
    try:
        if not stop:
            outputs.extend(run_block(block, inputs, kwargs, device, offload, prof, index, flops))
        else:
            tokens = sum(x.numel() // x.shape[-1] for x in inputs)
            skipped = sum(2.0 * tokens * get_module(block, n).weight.numel() for n in groups[-1].linears)
            with prof.stage("forward", index, flops - skipped if flops else 0.0):
                for x in inputs:
                    with prof.stage("copies", index):
                        x = x.to(device)
                    try:
                        block(x, **batch_kwargs(kwargs, x.shape[0]))
                    except _Stop:
                        pass
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def float_block_stats(model: nn.Module, arch: ArchSpec, calib_ids: torch.Tensor, needs: frozenset, *,
                      batch_size: int = 8, device: torch.device | str | None = None,
                      offload: torch.device | str = "cpu") -> list[dict[InputGroup, GroupStats]]:
    """Per block, the statistics of its input groups on the float model (each block fed the float outputs of the
    one before); the model is not changed. For a whole-model step before quantizing (SmoothQuant+)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    offload = torch.device(offload)
    blocks = get_module(model, arch.blocks)
    inputs, block_kwargs = capture_inputs(model, arch, calib_ids, batch_size, offload)
    out = []
    for i in range(len(blocks)):
        block = blocks[i].to(device)
        outputs: list[torch.Tensor] = []
        out.append(collect_stats(block, arch.groups, inputs, _to(block_kwargs[i], device), needs, device, offload,
                                 outputs))
        inputs = outputs
        blocks[i] = block.to(offload) if device != offload else block
    return out


def quantize_block(block: nn.Module, arch: ArchSpec, method, fmt, cfg,
                   stats: dict[InputGroup, GroupStats] | None = None, fmts: dict | None = None,
                   prof: Profile | None = None, index: int = -1) -> None:
    """Swap every linear of ``block`` for its quantized module; data-free methods get no ``stats`` (``{}``).
    ``fmts``: ``{linear name: Format}`` of linears quantized with another format than ``fmt``. ``prof``: the
    method's time is block ``index``'s ``solver`` stage (FLOPs: the error feedback's, for a Hessian method), building
    the packed module its ``packing``."""
    prof = prof or Profile()
    hess = "hessian" in method.stats_needed(cfg)
    for g in arch.groups:
        for name in g.linears:
            lin = get_module(block, name)
            f = fmt if fmts is None else fmts.get(name, fmt)
            with prof.stage("solver", index, feedback_flops(*lin.weight.shape) if hess else 0.0):
                qw = method.quantize_linear(lin.weight, {} if stats is None else stats[g], f, cfg)
            with prof.stage("packing", index):
                set_module(block, name, to_module(lin, qw))


def _save_resume(resume_dir: Path, i: int, block: nn.Module, next_inputs: list[torch.Tensor], fingerprint: dict,
                 tuned: dict | None = None) -> None:
    modules = module_entries(block)  # every quantized module type, as checkpoints record them
    meta = {"modules": modules, "fingerprint": fingerprint}
    if tuned is not None:
        meta["block_tune"] = tuned   # the block's output MSE before and after tuning, for the run summary
    with atomic_dir(resume_dir / f"block{i:04d}") as tmp:
        save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(tmp / "block.safetensors"))
        save_file({f"x{j}": x.contiguous() for j, x in enumerate(next_inputs)}, str(tmp / "inputs.safetensors"))
        (tmp / "block.json").write_text(json.dumps(meta))


def clear_resume_dir(resume_dir: Path) -> None:
    """Delete the finished-block folders in ``resume_dir`` (and the folder once empty); nothing else.

    A file the engine did not write is left, with a warning, so a mistyped path never costs data.
    """
    resume_dir = Path(resume_dir)
    if not resume_dir.is_dir():
        return
    for p in [*resume_dir.glob("block[0-9][0-9][0-9][0-9]"), *resume_dir.glob(".block*.tmp")]:
        shutil.rmtree(p, ignore_errors=True)
    try:
        resume_dir.rmdir()
    except OSError:
        log.warning("left %s: it holds files that are not finished blocks", resume_dir)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of ``model``'s config and every tensor of its state dict (names, dtypes, shapes and
    bytes), taken before anything is quantized: a resume folder belongs to exactly these weights.

    Hashing the weights in memory, rather than the files they came from, covers every source alike (zoo, HF
    folder, GGUF, a model built in Python) and any change made after loading; it costs one pass over the weights
    (a few seconds per GB), small beside calibrating them. The config leaves out where the model was loaded from.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def _block_dir(resume_dir: Path, i: int) -> Path:
    return resume_dir / f"block{i:04d}"


def _check_fingerprints(resume_dir: Path, fingerprint: dict) -> list[int]:
    """Indices of the finished-block folders in ``resume_dir``; ConfigError when a readable one is of another run."""
    found = sorted(int(p.name[5:]) for p in resume_dir.glob("block[0-9][0-9][0-9][0-9]"))
    for i in found:
        try:
            old = json.loads((_block_dir(resume_dir, i) / "block.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue   # damaged: redone, see _restore_prefix
        if old != fingerprint:
            differ = [k for k in fingerprint if not isinstance(old, dict) or old.get(k) != fingerprint[k]]
            raise ConfigError(
                f"{resume_dir} holds blocks of another run (different {', '.join(differ)}), so --resume cannot "
                f"continue it; run without --resume to start over (that deletes {resume_dir}), or choose another --out"
            )
    return found


def _restore_block(block: nn.Module, path: Path) -> nn.Module:
    """A copy of float ``block`` with the quantized modules and state saved in ``path``; ``block`` is untouched.
    Raises on a missing or damaged file (the caller redoes the block)."""
    meta = json.loads((path / "block.json").read_text())
    tensors = load_file(str(path / "block.safetensors"))
    restored = copy.deepcopy(block)
    for name, entry in meta["modules"].items():
        set_module(restored, name, build_module(name, entry))
    restored.load_state_dict(tensors, strict=True)
    return restored


def _restore_prefix(resume_dir: Path, blocks, fingerprint: dict) -> int:
    """Restore the longest run of finished blocks 0..k-1 from ``resume_dir`` into ``blocks``; returns k.

    Every block is checked (block.json and block.safetensors readable and matching the block). The first
    missing or damaged one ends the run: it and every later block are redone, and the later folders are deleted
    (they were made from the block that is gone). A folder of another run is a ConfigError.
    """
    found = _check_fingerprints(resume_dir, fingerprint)
    k, why = 0, None
    while k < len(blocks) and why is None:
        path = _block_dir(resume_dir, k)
        try:
            blocks[k] = _restore_block(blocks[k], path)
            k += 1
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, LowbitError) as e:
            why = "missing" if not path.exists() else f"damaged ({type(e).__name__}: {str(e)[:200]})"
    later = [i for i in found if i >= k]
    if later:
        log.warning("%s: block %d is %s; redoing blocks %d to %d", resume_dir, k, why, k, len(blocks) - 1)
        for i in later:
            shutil.rmtree(_block_dir(resume_dir, i), ignore_errors=True)
    return k


def _resume_inputs(resume_dir: Path, k: int, inputs: list[torch.Tensor], blocks, block_kwargs, device,
                   offload) -> list[torch.Tensor]:
    """The inputs of block ``k`` once blocks 0..k-1 are restored: those saved with block k-1 when it was the newest
    (only the newest block keeps them), else recomputed by running the restored blocks on ``inputs`` (block 0's,
    as captured); either way the tensors an uninterrupted run passes on."""
    try:
        saved = load_file(str(_block_dir(resume_dir, k - 1) / "inputs.safetensors"))
        if len(saved) == len(inputs) and all(saved[f"x{j}"].shape == x.shape for j, x in enumerate(inputs)):
            return [saved[f"x{j}"].to(offload) for j in range(len(inputs))]
    except (OSError, KeyError, SafetensorError):
        pass
    log.info("recomputing the inputs of block %d by running the restored blocks 0 to %d", k, k - 1)
    for j in range(k):
        block = blocks[j].to(device)
        inputs = run_block(block, inputs, _to(block_kwargs[j], device), device, offload)
        blocks[j] = block.to(offload) if device != offload else block
    return inputs


def run_layerwise(model: nn.Module, arch: ArchSpec, method, fmt, cfg, calib_ids: torch.Tensor, *,
                  batch_size: int = 8, device: torch.device | str | None = None,
                  offload: torch.device | str = "cpu", progress: bool = True,
                  resume_dir: str | Path | None = None, layer_fmts: list[dict] | None = None,
                  block_tune: BlockTuneConfig | None = None, profile: Profile | None = None) -> list[dict]:
    """Quantize every decoder block of ``model`` in place with ``method`` (see module doc).

    ``layer_fmts``: per block, ``{linear name: Format}`` of linears quantized with another format than ``fmt``
    (a block-level step such as AWQ's scale search still uses ``fmt``). ``block_tune``: tune each quantized block
    against the float block (:mod:`lowbit.calib.blocktune`). Returns, per block tuned, its output MSE before and
    after tuning and which result it kept (empty without ``block_tune``). ``profile``: records each stage's
    seconds and FLOPs there (:mod:`lowbit.calib.profile`)."""
    tune = block_tune is not None and block_tune.enabled
    if tune and block_tune.block_tune_batch > batch_size:
        raise ConfigError(f"--block-tune-batch {block_tune.block_tune_batch} is more than the engine's batch of "
                          f"{batch_size} windows (the blocks' call arguments are captured for that size)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    offload = torch.device(offload)
    blocks = get_module(model, arch.blocks)
    needs = method.stats_needed(cfg) | ({"block_outputs"} if tune else set())
    prof = profile or Profile()
    inputs, block_kwargs = capture_inputs(model, arch, calib_ids, batch_size, offload, prof)
    start = 0
    fingerprint = None
    records: list = []
    if resume_dir is not None:
        resume_dir = Path(resume_dir)
        resume_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest()[:16]
        fingerprint = {"method": method.name, "fmt": fmt.spec(), "cfg": asdict(cfg), "calib": h,
                       "n_blocks": len(blocks), "model": model_fingerprint(model)}
        if layer_fmts:
            fingerprint["layers"] = [{n: f.spec() for n, f in sorted(d.items())} for d in layer_fmts]
        if tune:
            fingerprint["block_tune"] = asdict(block_tune)
        start = _restore_prefix(resume_dir, blocks, fingerprint)
        records = [_tune_record(resume_dir, i) for i in range(start)] if tune else []
        if start:
            inputs = _resume_inputs(resume_dir, start, inputs, blocks, block_kwargs, device, offload)
            log.info("resuming after block %d from %s", start - 1, resume_dir)
    for i in tqdm(range(start, len(blocks)), desc=f"{method.name} blocks", disable=not progress,
                  initial=start, total=len(blocks)):
        with prof.stage("copies", i):
            block = blocks[i].to(device)
            kwargs = _to(block_kwargs[i], device)
        data = BlockData(block, i, inputs, kwargs, device)
        float_outputs = [] if "block_outputs" in needs else None
        fwd = _forward_flops(block, arch, calib_ids.shape)
        stats = collect_stats(block, arch.groups, inputs, kwargs, needs, device, offload, float_outputs,
                              getattr(cfg, "first_position_weight", 1.0), prof, i, fwd)
        if method.prepare_block is not None:
            with prof.stage("prepare", i):
                method.prepare_block(data, arch, stats, fmt, cfg)
        floats = {n: get_module(block, n).weight.detach().clone() for g in arch.groups for n in g.linears} if tune \
            else None   # the float weights the solver quantizes (after prepare_block): where block tuning starts
        quantize_block(block, arch, method, fmt, cfg, stats, layer_fmts[i] if layer_fmts else None, prof, i)
        del stats
        if method.finish_block is not None:
            with prof.stage("finish", i):
                method.finish_block(data, arch, float_outputs, cfg)
        if tune:
            from .blocktune import tune_block

            with prof.stage("finish", i):
                records.append(tune_block(block, i, floats, inputs, float_outputs, kwargs, device, block_tune,
                                          method.name, progress))
        del float_outputs, floats
        inputs = run_block(block, inputs, kwargs, device, offload, prof, i, fwd)
        with prof.stage("copies", i):
            blocks[i] = block.to(offload) if device != offload else block
        if resume_dir is not None:
            with prof.stage("resume_save", i):
                _save_resume(Path(resume_dir), i, block, inputs, fingerprint, records[-1] if tune else None)
                prev = Path(resume_dir) / f"block{i - 1:04d}" / "inputs.safetensors"
                prev.unlink(missing_ok=True)  # only the newest block's outputs are needed to resume
    return records


def _forward_flops(block: nn.Module, arch: ArchSpec, calib_shape) -> float:
    """FLOPs of one forward of float ``block`` over ``calib_shape`` ``(windows, window)`` tokens
    (:func:`lowbit.calib.profile.block_flops`)."""
    windows, window = calib_shape
    shapes = [tuple(get_module(block, n).weight.shape) for n in arch.linears]
    width = get_module(block, arch.qk[0]).weight.shape[0] if arch.qk else 0
    return block_flops(shapes, windows * window, windows, window, width)


def _tune_record(resume_dir: Path, i: int) -> dict | None:
    """The block-tuning record saved with restored block ``i`` (None if its block.json has none)."""
    try:
        return json.loads((_block_dir(resume_dir, i) / "block.json").read_text()).get("block_tune")
    except (OSError, ValueError):
        return None
