"""VPTQ: weighted k-means, the second-order VQ solver, the vq codec, fine-tuning, presets."""
import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.formats.codebook import nearest, weighted_kmeans
from lowbit.methods.vptq import VPTQConfig, preset_for, vptq_quantize, vq_layer_bits, vq_spec
from lowbit.nn import QuantizedLinear
from lowbit.nn.bpw import codec_bits, layer_bits
from lowbit.packing import pack, unpack
from lowbit.nn import to_module
from lowbit.quantize import QuantRecipe

from conftest import tiny_model

PLAIN = dict(outlier_pct=0.0, col_norm=False, col_perm=False)


def _calib(n=8, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n, seqlen), generator=g)


def _layer(out_f=48, in_f=64, seed=0):
    """A random weight and a strongly correlated Hessian (2 X^T X / n)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = torch.randn(2048, in_f, generator=g) @ mix * torch.rand(in_f, generator=g).add(0.2)
    return w, 2 * x.T @ x / x.shape[0]


def _out_err(w, h, q):
    d = w - q
    return float(torch.trace(d @ h @ d.T))


def test_weighted_kmeans_recovers_weighted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centers])
    # a few far points with ~zero weight must not pull the centroids
    x = torch.cat([x, torch.full((20, 2), 40.0)])
    w = torch.cat([torch.ones(800), torch.full((20,), 1e-6)])
    c, a = weighted_kmeans(x, w, 4, iters=50, seed=1)
    for ctr in centers:
        assert (c - ctr).norm(dim=1).min() < 0.05
    # each true cluster maps to one centroid
    for j in range(4):
        assert a[j * 200 : (j + 1) * 200].unique().numel() == 1
    # weights change the answer: weighted mean, not plain mean
    x1 = torch.tensor([[0.0], [1.0]])
    c1, _ = weighted_kmeans(x1, torch.tensor([3.0, 1.0]), 1)
    assert torch.allclose(c1, torch.tensor([[0.25]]))


def test_nearest_is_exact_argmin_in_chunks(monkeypatch):
    import lowbit.formats.codebook as cb

    monkeypatch.setattr(cb, "_CHUNK_ELEMS", 64)  # force many chunks
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 4, generator=g), torch.randn(40, 4, generator=g)
    idx, d = nearest(x, c)
    ref = torch.cdist(x, c)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(d, ref.min(1).values ** 2, atol=1e-4)


def test_identity_hessian_enough_centroids_is_lossless():
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(-8, 8, (12, 4), generator=g).float() / 8  # exact in fp16
    # 32 input columns of 16 vectors (4 consecutive output rows each), all drawn from the pool
    w = pool[torch.randint(0, 12, (32 * 16,), generator=g)].view(32, 64).T.contiguous()  # (out 64, in 32)
    qw = vptq_quantize(w, torch.eye(32), VPTQConfig(vector_len=4, codebook_size=16, **PLAIN))
    assert torch.equal(qw.dequantize(), w)


def test_second_order_beats_plain_nearest_centroid():
    # over 16 layers x k-means seeds the error ratio spreads over 0.88-0.93 (mean 0.90): a single layer
    # sits too close to any fixed bar, so the test takes four layers and asserts every one improves
    ratios = []
    for seed in range(4):
        w, h = _layer(seed=seed)
        cfg = VPTQConfig(vector_len=4, codebook_size=32, **PLAIN)
        plain = vptq_quantize(w, h, cfg, second_order=False)
        so = vptq_quantize(w, h, cfg)
        assert torch.equal(so.codebook, plain.codebook)  # same codebook: only the assignment differs
        ratios.append(_out_err(w, h, so.dequantize()) / _out_err(w, h, plain.dequantize()))
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.95, ratios


@pytest.mark.parametrize("second_order", [False, True])
def test_residual_never_worse(second_order):
    w, h = _layer(seed=1)
    errs = {}
    for kr in (0, 16):
        cfg = VPTQConfig(vector_len=4, codebook_size=32, residual_size=kr, outlier_pct=2.0)
        errs[kr] = _out_err(w, h, vptq_quantize(w, h, cfg, second_order).dequantize())
    assert errs[16] <= errs[0]


def test_outliers_norm_and_perm_run_and_help():
    w, h = _layer(seed=2)
    w[:, 3] *= 20  # one loud column
    base = VPTQConfig(vector_len=4, codebook_size=32, **PLAIN)
    full = VPTQConfig(vector_len=4, codebook_size=32, outlier_pct=5.0, outlier_vector_len=2, outlier_codebook_size=64)
    qb, qf = vptq_quantize(w, h, base), vptq_quantize(w, h, full)
    assert qf.n_outlier == 4 and qf.col_scale is not None
    assert _out_err(w, h, qf.dequantize()) < _out_err(w, h, qb.dequantize())


def test_vector_len_must_divide_out_features():
    w, h = _layer(out_f=50)
    with pytest.raises(ConfigError, match="not divisible by --vector-len 4"):
        vptq_quantize(w, h, VPTQConfig(vector_len=4, codebook_size=8))


@pytest.mark.parametrize("b", range(8, 17))
def test_indices_pack_unpack_exact(b):
    g = torch.Generator().manual_seed(b)
    k = 1 << b
    idx = torch.randint(0, k, (37, 29), generator=g)
    idx[0, 0], idx[-1, -1] = 0, k - 1
    assert torch.equal(unpack(pack(idx, b), b, idx.numel()).view(37, 29).long(), idx)


def test_codec_roundtrip_and_bpw_counts_everything():
    w, h = _layer(seed=3)
    cfg = VPTQConfig(vector_len=4, codebook_size=64, residual_size=8, outlier_pct=5.0)
    qw = vptq_quantize(w, h, cfg)
    lin = torch.nn.Linear(64, 48, bias=False)
    m = to_module(lin, qw)
    assert isinstance(m, QuantizedLinear)
    assert torch.equal(m.dequantize_weight(), qw.dequantize())
    rep = layer_bits(m)
    assert sum(rep["items"].values()) == vq_layer_bits(cfg, 48, 64)
    assert rep["items"] == codec_bits("vq", vq_spec(cfg, 48, 64))   # buffer by buffer, from the config alone
    assert set(rep["items"]) == {"idx", "codebook", "res_idx", "res_codebook", "outlier_cols", "out_idx",
                                 "out_codebook", "col_scale", "col_bias"}
    # idx: 12 x 60 codes of 6 bits; codebook 64 x 4 fp16
    assert rep["items"]["idx"] == 8 * ((12 * 60 * 4 + 7) // 8 + (12 * 60 * 2 + 7) // 8)
    assert rep["items"]["codebook"] == 64 * 4 * 16


def test_preset_hits_target_including_codebooks():
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    n = sum(o * i for o, i in shapes)
    for target in (2.0, 2.3, 3.0):
        cfg = preset_for(target, shapes)
        bits = sum(vq_layer_bits(cfg, o, i) for o, i in shapes)
        assert bits <= target * n
        assert bits > (target - 0.5) * n  # and is not far below it
    with pytest.raises(ConfigError, match="no VPTQ setting fits"):
        preset_for(0.05, shapes)


def test_cli_flags_do_not_collide():
    from lowbit.cli import build_parser

    args = build_parser().parse_args(["run", "m", "--method", "vptq", "--vector-len", "8", "--codebook-size", "4096",
                                      "--residual-size", "256", "--outlier-pct", "1", "--vptq-preset", "2.3"])
    assert args.vector_len == 8 and args.residual_size == 256 and args.vptq_preset == 2.3


def test_save_load_identical_logits_with_finetuning(tmp_path):
    m = tiny_model("llama")
    ids = _calib(4, 32, seed=99)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    cfg = dict(vector_len=4, codebook_size=64, residual_size=4, outlier_pct=3.0, kmeans_iters=5, ft_steps=3)
    recipe = QuantRecipe(method="vptq", method_config=cfg)
    lowbit.quantize(m, recipe, calib_ids=_calib(8, 32), progress=False)
    assert all(m.model.layers[0].get_submodule(n).spec["codec"] == "vq" for n in ("self_attn.q_proj", "mlp.down_proj"))
    with torch.no_grad():
        got = m(input_ids=ids).logits
    # ~2 bits per weight on a random model: GPTQ int2-g32 gives ~0.86 relative error here, int3-g32 ~0.26
    assert ((got - ref) ** 2).mean() < 0.7 * ref.pow(2).mean()
    lowbit.save(m, tmp_path / "ck")
    m2 = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, got)


def test_finetuning_never_raises_block_error():
    from lowbit.calib.engine import capture_inputs, run_block
    from lowbit.models.arch import arch_for

    cpu = torch.device("cpu")
    m0 = tiny_model("llama", seed=4)
    arch = arch_for(m0)
    inputs, kwargs = capture_inputs(m0, arch, _calib(8), batch_size=4, offload=cpu)
    ref = torch.cat(run_block(m0.model.layers[0], inputs, kwargs[0], cpu, cpu))
    errs = {}
    for steps in (0, 10):
        mm = tiny_model("llama", seed=4)
        cfg = dict(vector_len=4, codebook_size=16, outlier_pct=0.0, kmeans_iters=5, ft_steps=steps, ft_windows=4)
        lowbit.quantize(mm, QuantRecipe(method="vptq", method_config=cfg), calib_ids=_calib(8), progress=False)
        out = torch.cat(run_block(mm.model.layers[0], inputs, kwargs[0], cpu, cpu))
        errs[steps] = ((out - ref) ** 2).mean().item()
    assert errs[10] <= errs[0]
