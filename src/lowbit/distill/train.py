"""BitDistiller training: a fake-quantized student distils from its own float model.

Flow of :func:`distill`:

1. **Teacher data** (:mod:`.teacher`): sequences the float model generates,
   cached as JSONL (resumable), packed into ``seqlen`` token windows.
2. **Student init**: a copy of the model quantized with ``init`` (rtn, clip,
   gptq, awq, onebit, via :func:`lowbit.quantize`); each block linear becomes a
   :class:`~.fakequant.FakeQuantLinear` whose float weight is the original
   weight (rtn), the original weight clamped to each group's clipped range
   (clip), or the method's dequantized weight (gptq, awq: AWQ's folded
   scales stay in the norms); with ``onebit`` (OneBit's SVID, no number
   format) a :class:`~.fakequant.OneBitFakeLinear` whose latent weight is the
   original weight and whose value vectors are the SVID's. Other tensors are rounded to the storage dtype
   once, so export changes nothing but the packing.
3. **Training** with the Hugging Face ``Trainer`` (so ``accelerate launch``
   / DeepSpeed / multi-GPU are a change of ``--trainer-args``): each step runs
   the frozen teacher and the student on the same window and minimises the
   chosen loss (:mod:`.losses`); CAKLD's beta is estimated once from the
   teacher and stored in ``OUT.distill/distill.json``. Checkpoints go to
   ``OUT.distill/trainer/checkpoint-*``; a rerun resumes from the newest one (model,
   optimizer, scheduler, RNG and data position). The loss curve is written to
   ``OUT.distill/loss.csv`` at each save and at the end.
4. **Export**: every FakeQuantLinear becomes a packed QuantizedLinear with
   the same weight bit for bit, and the model is saved with :func:`lowbit.save`
   to ``OUT`` (loads and evaluates like any other lowbit checkpoint).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import CalibConfig, FormatConfig, StorageConfig
from ..errors import ConfigError
from ..models.arch import arch_for, get_module, set_module
from .fakequant import TRAINABLE, FakeQuantLinear, OneBitFakeLinear
from .losses import LOSSES, distill_loss, teacher_confidence
from .teacher import TeacherDataConfig, generate_teacher_data

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "INITS", "work_dir", "build_student", "pack_windows", "export_student", "distill", "train_student"]

INITS = ("clip", "gptq", "awq", "rtn", "onebit")


@dataclass(frozen=True)
class DistillConfig:
    """A BitDistiller run (CLI flags of ``lowbit distill`` are generated from this)."""

    loss: str = "cakld"            # cakld | forward | reverse | ce
    init: str = "clip"             # student init: clip | gptq | awq | rtn | onebit (1-bit, no format)
    steps: int = 1000              # optimizer steps (the budget)
    seqlen: int = 512              # tokens per training window
    batch_size: int = 4            # windows per device per step
    grad_accum: int = 1            # gradient accumulation steps
    lr: float = 1e-5               # peak learning rate (AdamW)
    lr_schedule: str = "cosine"    # any transformers scheduler name (cosine, constant, linear, ...)
    save_steps: int = 100          # checkpoint every N steps (resumable)
    cakld_batches: int = 20        # batches used to estimate CAKLD's beta
    train_all: bool = False        # also train norms/embeddings/head (export then rounds them to storage)
    teacher_data: str = ""         # teacher JSONL (default OUT.distill/teacher.jsonl; share it between runs)
    teacher_source: str = "wiki-train"  # text whose paragraphs prompt the teacher
    teacher_samples: int = 512     # sequences the teacher generates
    prompt_tokens: int = 16        # prompt tokens per sequence
    max_new_tokens: int = 256      # generated tokens per sequence
    temperature: float = 0.7       # teacher sampling temperature
    gen_batch_size: int = 8        # prompts generated together
    calib: str = CalibConfig.source             # calibration text for clip/gptq/awq init
    nsamples: int = CalibConfig.nsamples        # calibration windows for the init
    calib_seqlen: int = CalibConfig.seqlen      # tokens per calibration window
    seed: int = 0                  # seed of teacher sampling, calibration windows and training
    storage: str = "float16"       # storage dtype of the unquantized tensors
    resume: bool = True            # continue from OUT/trainer's newest checkpoint when there is one
    trainer_args: str = ""         # JSON of extra transformers TrainingArguments (bf16, deepspeed, ...)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.init not in INITS:
            raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.steps < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError("--steps, --batch-size must be >= 1 and --seqlen >= 2")
        StorageConfig(self.storage)

    def teacher_config(self) -> TeacherDataConfig:
        return TeacherDataConfig(self.teacher_source, self.teacher_samples, self.prompt_tokens, self.max_new_tokens,
                                 self.temperature, self.gen_batch_size, self.seed)


# ---------------------------------------------------------------- student

def _group_bounds(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clamp bounds from a dequantized weight: its min/max, open where they do not straddle 0."""
    from ..formats import group_layout

    lay = group_layout(w.shape[1], group_size)
    g = lay.to_groups(w)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    # a group without negative (positive) weights was not clipped from below (above)
    return torch.where(lo < 0, lo, torch.full_like(lo, -float("inf"))), torch.where(hi > 0, hi, torch.full_like(hi, float("inf")))


def build_student(model: nn.Module, fmt_cfg: FormatConfig, init: str = "rtn", calib_ids: torch.Tensor | None = None,
                  storage: str = "float16", progress: bool = False, method_config: dict | None = None) -> nn.Module:
    """A fake-quantized copy of ``model`` initialised with ``init`` (see module doc); ``model`` is unchanged.

    ``method_config``: settings of the init method (e.g. ``{"clip_grid": 10}``), defaults otherwise.
    """
    from ..api import quantize
    from ..formats.clip import apply_clip
    from ..quantize import QuantRecipe

    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    fmt = fmt_cfg.make()
    student = copy.deepcopy(model)
    quantize(student, QuantRecipe(method=init, fmt=fmt_cfg, method_config=dict(method_config or {}),
                                  storage=StorageConfig(storage),
                                  calib={"ids": "given"} if calib_ids is not None else None),
             calib_ids=calib_ids, progress=progress)  # rounds the other tensors to `storage` too
    arch = arch_for(model)
    fblocks, sblocks = get_module(model, arch.blocks), get_module(student, arch.blocks)
    for fb, sb in zip(fblocks, sblocks):
        for name in arch.linears:
            q = get_module(sb, name)
            if init == "onebit":
                qw = q.codec.to_weight(q.packed_buffers(), q.spec)
                w = get_module(fb, name).weight.detach().float()
                set_module(sb, name, OneBitFakeLinear.from_onebit(w, qw, getattr(q, "bias", None)))
                continue
            w_q = q.dequantize_weight()
            if init == "rtn":
                w = get_module(fb, name).weight.detach().float()
            elif init == "clip":  # keep the float weights, clamped to the searched ranges
                gs = fmt.for_width(w_q.shape[1]).group_size
                lo, hi = _group_bounds(w_q, gs)
                w = apply_clip(get_module(fb, name).weight.detach().float(), lo, hi, gs)
            else:
                w = w_q
            set_module(sb, name, FakeQuantLinear.from_linear(q, fmt, weight=w))
    for p in student.parameters():
        p.requires_grad_(False)
    for m in student.modules():
        if isinstance(m, TRAINABLE):
            for p in m.trainable():
                p.requires_grad_(True)
    return student


def export_student(student: nn.Module, recipe_dict: dict, storage: str = "float16") -> nn.Module:
    """Swap every trainable stand-in (FakeQuantLinear, OneBitFakeLinear) for its packed QuantizedLinear (same weight
    bit for bit), in place."""
    from ..quantize import finalize_storage

    names = [n for n, m in student.named_modules() if isinstance(m, TRAINABLE)]
    for n in names:
        set_module(student, n, get_module(student, n).to_packed())
    for p in student.parameters():
        p.requires_grad_(False)
    finalize_storage(student, StorageConfig(storage))
    summary = dict(getattr(student, "lowbit_summary", {}) or {})
    summary["recipe"] = recipe_dict
    student.lowbit_summary = summary
    return student


# ---------------------------------------------------------------- data

def pack_windows(items: list[dict], seqlen: int, eos_id: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Teacher sequences joined by EOS into one stream, cut into ``(n, seqlen)`` windows (BOS-led with ``bos_id``)."""
    stream: list[int] = []
    for it in items:
        stream.extend(it["ids"])
        if eos_id is not None:
            stream.append(eos_id)
    from ..errors import DataError
    from ..eval.ppl import make_windows

    try:
        return make_windows(torch.tensor(stream, dtype=torch.long), seqlen, None, bos_id)
    except DataError:
        raise ConfigError(f"teacher data has {len(stream)} tokens, fewer than one window of {seqlen}; "
                          "generate more (--teacher-samples, --max-new-tokens) or lower --seqlen") from None


# ---------------------------------------------------------------- training

def _loss_rows(log_history: list[dict]) -> list[dict]:
    return [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in log_history if "loss" in h]


def write_loss_curve(log_history: list[dict], out: Path) -> Path:
    path = Path(out) / "loss.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        w.writeheader()
        w.writerows(_loss_rows(log_history))
    return path


def _make_trainer(student, teacher, ds, cfg: DistillConfig, beta: float | None, out: Path, progress: bool, callbacks):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            dev = inputs["input_ids"].device
            if next(teacher.parameters()).device != dev:
                teacher.to(dev)
            with torch.no_grad():
                t_logits = teacher(**fwd, use_cache=False).logits
            out_ = model(**fwd, use_cache=False)
            loss = distill_loss(cfg.loss, out_.logits, t_logits, labels, beta)
            return (loss, out_) if return_outputs else loss

    class LossCurve(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                write_loss_curve(state.log_history, out)

    extra = json.loads(cfg.trainer_args) if cfg.trainer_args else {}
    args = TrainingArguments(**{
        "output_dir": str(out / "trainer"), "max_steps": cfg.steps, "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum, "learning_rate": cfg.lr, "lr_scheduler_type": cfg.lr_schedule,
        "weight_decay": 0.0, "logging_steps": 1, "save_strategy": "steps", "save_steps": cfg.save_steps,
        "save_total_limit": 2, "report_to": "none", "seed": cfg.seed, "data_seed": cfg.seed,
        "remove_unused_columns": False, "dataloader_num_workers": 0, "disable_tqdm": not progress,
        "dataloader_pin_memory": torch.cuda.is_available(), **extra})
    return DistillTrainer(model=student, args=args, train_dataset=ds, callbacks=[LossCurve(), *(callbacks or [])])


def train_student(student, teacher, windows: torch.Tensor, cfg: DistillConfig, out, progress: bool = True,
                  callbacks=None) -> dict:
    """Train ``student`` in place on ``windows`` ``(n, seqlen)``; resumable from ``out/trainer``. Returns run info."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.train_all:
        for p in student.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    ds = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in windows]
    state_path = out / "distill.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    beta = state.get("beta")
    if cfg.loss == "cakld" and beta is None:
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size)
        beta = teacher_confidence(teacher, loader, cfg.cakld_batches)
        log.info("CAKLD beta (teacher mean top-token probability): %.4f", beta)
    state.update(beta=beta, config=asdict(cfg), n_windows=len(ds))
    state_path.write_text(json.dumps(state, indent=1))
    trainer = _make_trainer(student, teacher, ds, cfg, beta, out, progress, callbacks)
    last = get_last_checkpoint(str(out / "trainer")) if (out / "trainer").is_dir() and cfg.resume else None
    if last:
        log.info("resuming from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    curve = write_loss_curve(trainer.state.log_history, out)
    student.eval()
    return {"beta": beta, "train_loss": result.training_loss, "global_step": trainer.state.global_step,
            "losses": [r["loss"] for r in _loss_rows(trainer.state.log_history)], "loss_curve": str(curve),
            "resumed_from": last, "trainer": trainer}


def work_dir(out) -> Path:
    """Teacher data, trainer checkpoints, loss curve and run state live next to the checkpoint: ``OUT.distill/``."""
    return Path(str(out).rstrip("/") + ".distill")


def distill(model, tokenizer, fmt_cfg: FormatConfig, cfg: DistillConfig, out, source_model: str | None = None,
            progress: bool = True, save: bool = True, callbacks=None) -> tuple[nn.Module, dict]:
    """The whole run (module doc): teacher data, init, training, export to a packed checkpoint in ``out``.

    Work files (teacher JSONL, ``trainer/`` checkpoints, ``loss.csv``, ``distill.json``) go to ``OUT.distill/``.

    ``model`` (float) is the teacher and stays unchanged. Returns ``(packed student, summary)``.
    """
    import time

    from .._version import __version__
    from ..quantize import check_finite_weights
    from ..utils import peak_memory_gb

    check_finite_weights(model)  # before minutes of teacher generation, not at the student's init
    t0 = time.perf_counter()
    out = Path(out)
    work = work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    arch = arch_for(model)
    bos = tokenizer.bos_token_id if arch.bos_per_window else None
    tdata = Path(cfg.teacher_data) if cfg.teacher_data else work / "teacher.jsonl"
    items = generate_teacher_data(model, tokenizer, tdata, cfg.teacher_config(), bos_id=None, progress=progress)
    windows = pack_windows(items, cfg.seqlen, tokenizer.eos_token_id, bos)
    calib_ids = None
    if cfg.init not in ("rtn", "onebit"):   # both are data-free
        from ..data.calib import sample_windows

        calib_ids = sample_windows(tokenizer, cfg.calib, cfg.nsamples, cfg.calib_seqlen, cfg.seed, bos_id=bos)
    student = build_student(model, fmt_cfg, cfg.init, calib_ids, cfg.storage, progress)
    run = train_student(student, model, windows, cfg, work, progress, callbacks)
    run.pop("trainer")
    # a OneBit student stores no number format: its own recipe name, tagged by its training settings
    recipe = {"method": "onebit-kd" if cfg.init == "onebit" else "bitdistiller",
              "fmt": None if cfg.init == "onebit" else asdict(fmt_cfg),
              "method_config": {"init": cfg.init, "loss": cfg.loss, "steps": cfg.steps, "seqlen": cfg.seqlen},
              "embed": None, "head": None, "storage": {"dtype": cfg.storage},
              "calib": {"source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.calib_seqlen, "seed": cfg.seed}
              if calib_ids is not None else None}
    export_student(student, recipe, cfg.storage)
    summary = {"recipe": recipe, "distill": {**asdict(cfg), "beta": run["beta"], "final_loss": run["losses"][-1],
                                             "teacher_data": str(tdata), "n_windows": int(windows.shape[0])},
               "quant_time_s": round(time.perf_counter() - t0, 2), "peak_mem_gb": peak_memory_gb(),
               "lowbit_version": __version__}
    student.lowbit_summary = summary
    if getattr(model, "lowbit_n_params", None) is not None:
        student.lowbit_n_params = model.lowbit_n_params
    if save:
        from ..api import save as save_ckpt

        save_ckpt(student, out, tokenizer, source_model=source_model)
    return student, summary
