"""Size budgets: per-tensor sensitivity scores, the knapsack allocator, per-layer formats in the pipeline."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import reload_same_logits, tiny_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def _ids(n: int = 4, t: int = 32) -> torch.Tensor:
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


def test_linear_damage_is_the_mean_squared_output_error():
    from lowbit.calib.sensitivity import linear_damage
    from lowbit.config import parse_format_tag
    from lowbit.formats import quantize_rtn

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 64, generator=g), torch.randn(100, 64, generator=g)
    fmt = parse_format_tag("int3-g32").make()
    damage, energy = linear_damage(w, 2 * x.T @ x / 100, {"int3-g32": fmt})
    d = w - quantize_rtn(w, fmt).dequantize()
    assert damage["int3-g32"] == pytest.approx(float(((x @ d.T) ** 2).sum(1).mean()), rel=1e-4)
    assert energy == pytest.approx(float(((x @ w.T) ** 2).sum(1).mean()), rel=1e-4)


def test_sensitivity_pass_scores_every_tensor_and_more_bits_do_less_damage():
    from lowbit.calib.sensitivity import sensitivity_pass
    from lowbit.config import parse_format_tag
    from lowbit.models.arch import arch_for

    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arch = arch_for(m)
    fmts = {t: parse_format_tag(t).make() for t in ("int2-g32", "int4-g32", "int8-g32")}
    s = sensitivity_pass(m, arch, fmts, _ids(), embed_head=True, progress=False)
    assert len(s["damage"]) == 2 * len(arch.linears) + 2 and {arch.embed, arch.head} <= set(s["damage"])
    for name, d in s["damage"].items():
        assert d["int2-g32"] > d["int4-g32"] > d["int8-g32"] > 0, name
        assert s["energy"][name] > d["int2-g32"]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())   # the model is left float
