"""The same code path on a CUDA GPU: every method calibrates on the GPU and agrees with the CPU run.

Skipped where torch sees no GPU (CI). The model stays on the CPU and the
engine moves one block at a time to the GPU, the path ``lowbit run --device
cuda`` takes.
"""
import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.config import FormatConfig
from lowbit.quantize import QuantRecipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FMT4 = FormatConfig(bits=4, group_size=32)
W8 = FormatConfig(bits=8, group_size=-1, sym=True)
CASES = {
    "rtn": (FMT4, {}),
    "gptq": (FMT4, {"act_order": True}),
    "awq": (FMT4, {}),
    "clip": (FormatConfig(format="nf", bits=3, group_size=32), {}),
    "vptq": (FMT4, {"vector_len": 4, "codebook_size": 64, "kmeans_iters": 10, "ft_steps": 2, "ft_windows": 2}),
    "smoothquant": (W8, {}),
    "w8a8": (W8, {}),
    "flattenquant": (W8, {"fq_int4_budget": 0.5}),
}


def _ids(n, seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n, seqlen), generator=g)


def _logits(m, device):
    m.to(device)
    with torch.no_grad():
        return m(input_ids=_ids(4, 32, 99).to(device)).logits.float().cpu()


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_on_gpu_matches_cpu(arch, method):
    fmt, mcfg = CASES[method]
    recipe = QuantRecipe(method=method, fmt=fmt, method_config=mcfg)
    ref = _logits(tiny_model(arch), "cpu")
    out = {}
    for dev in ("cpu", "cuda"):
        m = tiny_model(arch)
        summary = lowbit.quantize(m, recipe, calib_ids=_ids(16, 64, 0), progress=False, device=dev)
        assert summary["quant_time_s"] >= 0
        out[dev] = _logits(m, dev)
    assert torch.isfinite(out["cuda"]).all()
    err = {d: ((o - ref) ** 2).mean().item() for d, o in out.items()}
    gap = ((out["cuda"] - out["cpu"]) ** 2).mean().item()
    # GPU and CPU round differently (TF32 off, but other reduction orders), so a few codes may flip;
    # the two runs must still agree far better than either agrees with the float model
    assert gap < 0.25 * max(err.values()) + 1e-8, (method, err, gap)
    assert err["cuda"] < 1.5 * err["cpu"] + 1e-8, (method, err)


@pytest.mark.parametrize("tag", ["int4-g32", "int3-sym-g64", "fp4-g32", "nf3-g32", "int2-pc"])
def test_quantized_linear_on_gpu_equals_cpu(tag):
    from lowbit.config import parse_format_tag
    from lowbit.formats import quantize_rtn
    from lowbit.nn import to_module

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = to_module(lin, quantize_rtn(lin.weight.detach(), parse_format_tag(tag).make()))
    x = torch.randn(5, 96)
    y_cpu = q(x)
    y_gpu = q.to("cuda")(x.cuda()).cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-4, atol=1e-4)


def test_cli_run_records_the_gpu(tmp_path, tiny_dir, text_file):
    import json

    from lowbit.cli import main

    rc = main(["-q", "run", str(tiny_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
               "--calib", str(text_file), "--nsamples", "8", "--calib-seqlen", "32",
               "--ppl", str(text_file), "--seqlen", "32", "--windows", "4",
               "--device", "cuda", "--results-dir", str(tmp_path)])
    assert rc == 0
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert res["env"]["device"].startswith("cuda")
    assert res["ppl"][str(text_file)] > 1


def test_generate_kernel_act_on_the_gpu_warns(tmp_path, tiny_dir, caplog, capsys):
    """``--kernel-act`` only concerns the CPU kernels: on the GPU it says so and generates as usual."""
    from lowbit.cli import main

    out = tmp_path / "q4"
    assert main(["-q", "quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(out)]) == 0
    with caplog.at_level("WARNING", logger="lowbit"):
        assert main(["-q", "generate", str(out), "the truth", "--max-new-tokens", "4", "--kernel-act", "q8",
                     "--device", "cuda"]) == 0
    assert capsys.readouterr().out.strip()
    assert any("--kernel-act" in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("m,k,n", [(1, 40, 5), (16, 64, 8), (33, 96, 19), (1024, 576, 1536)])
def test_int_mm_on_cuda_is_exact(monkeypatch, m, k, n):
    from lowbit.kernels.intmm import dispatcher, int_mm, int_mm_backend

    monkeypatch.setenv("LOWBIT_INTMM", "torch")   # cuBLASLt's _int_mm, padded where its shape rules need it
    dispatcher.clear()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ref = (a.long() @ b.long().T).int()
    assert int_mm_backend(a.cuda(), b.cuda()) == "torch"
    assert torch.equal(int_mm(a.cuda(), b.cuda()).cpu(), ref)


@pytest.mark.parametrize("mode", ["lwc", "ap"])
def test_block_tune_on_the_gpu(mode):
    """--block-tune runs where the engine puts the block (the GPU) and never raises a block's output error."""
    from lowbit.config import BlockTuneConfig

    ids = torch.randint(0, 320, (8, 48), generator=torch.Generator().manual_seed(0))
    m = tiny_model("llama")
    recipe = QuantRecipe(method="gptq", fmt=FormatConfig("nf", 3, 32), block_tune=BlockTuneConfig(mode))
    s = lowbit.quantize(m, recipe, ids, progress=False, device="cuda")
    assert all(r["kept"] == "solver" or r["mse_after"] < r["mse_before"] for r in s["block_tune"])
