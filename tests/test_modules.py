"""The quantized-module registry: every kind becomes a JSON entry and is rebuilt from it exactly."""
import json

import pytest
import torch
from torch import nn

from lowbit.errors import CheckpointError
from lowbit.formats import IntFormat, quantize_rtn
from lowbit.formats.dual_grained import fit_dual_grained
from lowbit.methods.vptq import VPTQConfig, vptq_quantize
from lowbit.nn import QuantizedEmbedding, scalar_spec, to_module
from lowbit.nn.dgq import from_dual_grained
from lowbit.nn.registry import MODULE_KINDS, build_module, module_entries, module_entry
from lowbit.nn.w8a8 import act_spec, from_quantized_weight

G = torch.Generator().manual_seed(0)


def _linear(bias=True):
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=G))
        if bias:
            lin.bias.copy_(torch.randn(48, generator=G))
    return lin


def _samples():
    """``(kind, module, input)``: every registered kind, with its optional parts (bias, flattening, outliers) set."""
    lin = _linear()
    emb_w = torch.randn(40, 32, generator=G)
    flat_idx = torch.repeat_interleave(torch.arange(64), torch.tensor([2] + [1] * 63))     # channel 0 split in two
    flat_k = torch.where(flat_idx == 0, 2, 1)
    act = from_quantized_weight(quantize_rtn(lin.weight[:, flat_idx], IntFormat(8, -1, sym=True)),
                                act_spec(64, 48, flat_features=65), 0.05, flat_idx, flat_k)
    vq = vptq_quantize(lin.weight, torch.eye(64), VPTQConfig(vector_len=4, codebook_size=16, residual_size=4,
                                                             outlier_pct=5.0, kmeans_iters=2))
    x = torch.randn(3, 64, generator=G)
    return [
        ("linear", to_module(lin, quantize_rtn(lin.weight, IntFormat(3, 32))), x),
        ("linear", to_module(_linear(bias=False), vq), x),
        ("act_linear", to_module(lin, act), x),
        ("dgq_linear", to_module(lin, from_dual_grained(fit_dual_grained(lin.weight, 24))), x),   # ragged groups
        ("embedding", QuantizedEmbedding.from_quantized(quantize_rtn(emb_w, IntFormat(4, 16)),
                                                        scalar_spec(IntFormat(4, 16), 40, 32), 0, 5.5),
         torch.tensor([[0, 3, 39]])),
    ]


def test_every_registered_kind_round_trips():
    samples = _samples()
    assert {k for k, _, _ in samples} == set(MODULE_KINDS), "add a sample for each registered kind"
    for kind, mod, x in samples:
        entry = json.loads(json.dumps(module_entry(mod)))        # through JSON, as checkpoints store it
        assert entry["type"] == kind
        rebuilt = build_module("m", entry)
        assert type(rebuilt) is type(mod)
        rebuilt.load_state_dict(mod.state_dict(), strict=True)
        assert module_entry(rebuilt) == entry
        for k, t in mod.state_dict().items():
            assert rebuilt.state_dict()[k].dtype == t.dtype and torch.equal(rebuilt.state_dict()[k], t), k
        with torch.no_grad():
            assert torch.equal(rebuilt(x), mod(x)), kind


def test_entries_cover_only_quantized_modules():
    model = nn.Sequential(_linear(), nn.ReLU(), to_module(_linear(), quantize_rtn(_linear().weight, IntFormat(4, 32))))
    assert list(module_entries(model)) == ["2"]
    assert module_entry(model[0]) is None


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown type 'conv'"):
        build_module("layers.0", {"type": "conv", "spec": {}})
