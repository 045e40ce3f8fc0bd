"""BitDistiller: fake-quant STE, clipping init, teacher data, losses, training, resume, export (tiny models)."""
import json

import pytest
import torch

import lowbit
from lowbit.config import FormatConfig
from lowbit.formats.clip import apply_clip, clip_search
from lowbit.distill.fakequant import FakeQuantLinear
from lowbit.distill.losses import cakld, distill_loss, teacher_confidence
from lowbit.distill.teacher import TeacherDataConfig, generate_teacher_data, read_teacher_data
from lowbit.distill.train import DistillConfig, build_student, export_student, train_student
from lowbit.formats import quantize_rtn
from lowbit.nn import QuantizedLinear
from lowbit.quantize import QuantRecipe

from conftest import tiny_model, tiny_tokenizer

FORMATS = [FormatConfig("int", 2, 32, False), FormatConfig("int", 3, 32, True), FormatConfig("nf", 3, 32, False),
           FormatConfig("nf", 4, 32, True), FormatConfig("fp", 4, 32, False)]


def _ids(n=4, t=32, seed=0):
    return torch.randint(3, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fc", FORMATS, ids=lambda f: f.tag())
def test_ste_grads_flow_and_forward_is_rtn(fc):
    fmt = fc.make()
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 8)  # 48 columns: a short last group
    fq = FakeQuantLinear.from_linear(lin, fmt)
    x = torch.randn(5, 48)
    y = fq(x)
    assert torch.equal(fq.quantized_weight(), quantize_rtn(lin.weight, fmt).dequantize())
    y.pow(2).sum().backward()
    g = fq.weight.grad
    assert g is not None and g.abs().sum() > 0
    # straight-through: the gradient is that of a plain linear with the quantized weight
    w = fq.quantized_weight().detach().requires_grad_(True)
    torch.nn.functional.linear(x, w, fq.bias).pow(2).sum().backward()
    assert torch.allclose(g, w.grad)


def test_cakld_zero_on_equal_and_beta():
    t = torch.randn(2, 5, 11)
    lab = torch.zeros(2, 5, dtype=torch.long)
    assert cakld(t, t.clone(), 0.3).abs().item() < 1e-6
    s = torch.randn(2, 5, 11)
    fwd, rev = distill_loss("forward", s, t, lab), distill_loss("reverse", s, t, lab)
    assert torch.allclose(cakld(s, t, 0.3), 0.3 * rev + 0.7 * fwd, atol=1e-6)
    assert not torch.allclose(fwd, rev)

    class Fixed(torch.nn.Module):  # a "teacher" with known logits
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            from types import SimpleNamespace
            return SimpleNamespace(logits=t[: input_ids.shape[0]])

    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": lab}]
    beta = teacher_confidence(Fixed(), batches)
    assert beta == pytest.approx(torch.softmax(t, -1).amax(-1).mean().item(), rel=1e-5)


def test_clip_search_beats_no_clip_and_method_runs():
    fmt = FormatConfig("nf", 3, 32, False).make()
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 3] = 8.0  # an outlier worth clipping
    x = torch.randn(256, 64)
    lo, hi = clip_search(w, x, fmt, n_grid=8)
    wc = apply_clip(w, lo, hi, 32)
    err = lambda v: ((x @ (quantize_rtn(v, fmt).dequantize() - w).T) ** 2).mean().item()
    assert err(wc) < err(w)
    assert (lo <= 0).all() and (hi >= 0).all()
    m = tiny_model("llama")
    lowbit.quantize(m, QuantRecipe(method="clip", fmt=FormatConfig("int", 2, 32), method_config={"clip_grid": 4}),
                   calib_ids=_ids(4, 32), progress=False)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantizedLinear)


@pytest.mark.parametrize("fc,init", [(FormatConfig("nf", 3, 32, False), "clip"),
                                     (FormatConfig("int", 2, 32, False), "gptq"),
                                     (FormatConfig("int", 3, 32, True), "rtn")], ids=["nf3-clip", "int2-gptq", "int3sym-rtn"])
def test_fake_quant_equals_packed_export(tmp_path, fc, init, monkeypatch):
    # table formats pick a batch path by timing, and the paths agree to float rounding only (docs/kernels.md);
    # the bitwise claim here is for the dequantized-weight path that training uses
    monkeypatch.setenv("LOWBIT_BATCH_PATH", "dense")
    m = tiny_model("llama")
    student = build_student(m, fc, init, _ids(8, 32) if init != "rtn" else None, method_config={"clip_grid": 4} if init == "clip" else None)
    ids = _ids(2, 32, seed=5)  # 64 tokens: the plain (dequantized weight) path, as in training
    with torch.no_grad():
        ref = student(input_ids=ids).logits
    export_student(student, {"method": "bitdistiller", "fmt": vars(fc)})
    assert isinstance(student.model.layers[1].self_attn.o_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, ref)
    lowbit.save(student, tmp_path / "ck")
    back = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)


def test_teacher_data_resumes(tmp_path, text_file):
    m, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = TeacherDataConfig(source=str(text_file), n_samples=5, prompt_tokens=6, max_new_tokens=6, batch_size=2)
    full = generate_teacher_data(m, tok, tmp_path / "a.jsonl", cfg, progress=False)
    assert [d["index"] for d in full] == list(range(5)) and all(len(d["ids"]) > 6 for d in full)
    # interrupted run: only the first chunk (and a torn line) on disk; a rerun finishes it identically
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    part = tmp_path / "b.jsonl"
    part.write_text("\n".join(l for l in lines if json.loads(l)["index"] < 2) + "\n" + lines[-1][:10])
    again = generate_teacher_data(m, tok, part, cfg, progress=False)
    assert [d["ids"] for d in again] == [d["ids"] for d in full]
    assert sorted(read_teacher_data(part)) == list(range(5))


def _train(tmp, steps, callbacks=None, resume=True):
    m = tiny_model("llama")
    fc = FormatConfig("int", 2, 32, False)
    student = build_student(m, fc, "rtn")
    cfg = DistillConfig(loss="cakld", init="rtn", steps=steps, seqlen=32, batch_size=2, lr=2e-3, lr_schedule="constant",
                        save_steps=3, cakld_batches=2, resume=resume)
    windows = _ids(12, 32, seed=3)
    return train_student(student, m, windows, cfg, tmp, progress=False, callbacks=callbacks), student, m, windows


def test_training_reduces_kd_loss_and_resume_matches(tmp_path):
    from transformers import TrainerCallback

    run, student, teacher, windows = _train(tmp_path / "full", 6)
    assert 0 < run["beta"] < 1
    losses = run["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (tmp_path / "full" / "loss.csv").is_file()

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    first, _, _, _ = _train(tmp_path / "cut", 6, [StopAt3()])
    assert first["global_step"] == 3
    second, s2, _, _ = _train(tmp_path / "cut", 6)
    assert second["resumed_from"] is not None and second["global_step"] == 6
    assert second["losses"] == pytest.approx(losses, rel=1e-4, abs=1e-5)
    for (n, p), (_, q) in zip(student.named_parameters(), s2.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_cli_distill_end_to_end(tmp_path, tiny_dir, text_file):
    from lowbit.cli import main
    from lowbit.io import read_meta

    out = tmp_path / "ck"
    rc = main(["-q", "distill", str(tiny_dir), "--format", "nf", "--bits", "3", "--group-size", "32", "--loss", "forward",
               "--init", "rtn", "--steps", "2", "--seqlen", "16", "--batch-size", "2", "--teacher-source", str(text_file),
               "--teacher-samples", "4", "--max-new-tokens", "8", "--prompt-tokens", "8", "--out", str(out)])
    assert rc == 0
    meta = read_meta(out)
    assert meta["summary"]["recipe"]["method"] == "bitdistiller"
    assert (tmp_path / "ck.distill" / "loss.csv").is_file()
    m = lowbit.load(out)
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantizedLinear)
    # evaluating the student records the training run beside the scores (the report's budget column)
    res_dir = tmp_path / "res"
    assert main(["-q", "eval", str(out), "--ppl", str(text_file), "--seqlen", "16", "--windows", "2",
                 "--results-dir", str(res_dir)]) == 0
    import json

    (res_file,) = res_dir.glob("*bitdistiller*.json")
    res = json.loads(res_file.read_text())
    assert res["distill"]["steps"] == 2 and res["distill"]["batch_size"] == 2
    assert res["distill"]["teacher_samples"] == 4 and res["distill"]["loss"] == "forward"


def test_onebit_fake_linear_ste_and_export():
    from lowbit.distill.fakequant import OneBitFakeLinear
    from lowbit.formats.binary import pm_one
    from lowbit.methods.onebit import onebit_quantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 12)
    qw = onebit_quantize(lin.weight)
    fq = OneBitFakeLinear.from_onebit(lin.weight, qw, lin.bias)
    # at init it computes the SVID weight exactly
    assert torch.equal(fq.quantized_weight(), qw.dequantize())
    x = torch.randn(3, 40)
    fq(x).pow(2).sum().backward()
    # straight-through sign and fp16 rounding: the gradients are those of W_q = diag(g) S diag(h) in g, h and S
    g, h, s = (qw.out_scale.clone().requires_grad_(True), qw.in_scale.clone().requires_grad_(True),
               pm_one(qw.signs).float().requires_grad_(True))
    torch.nn.functional.linear(x, g[:, None] * s * h[None, :], lin.bias).pow(2).sum().backward()
    assert torch.allclose(fq.out_scale.grad, g.grad) and torch.allclose(fq.in_scale.grad, h.grad)
    assert torch.allclose(fq.weight.grad, s.grad)
    # after a step off the fp16 grid the packed layer still decodes to exactly the trained weight
    with torch.no_grad():
        fq.out_scale.mul_(1.0123)
        fq.weight.mul_(-1)
    packed = fq.to_packed()
    assert torch.equal(packed.dequantize_weight(), fq.quantized_weight().detach())


def test_onebit_student_trains_and_exports(tmp_path):
    from lowbit.distill.fakequant import OneBitFakeLinear

    m = tiny_model("llama")
    student = build_student(m, FormatConfig("int", 2, 32, False), "onebit")
    o = student.model.layers[0].self_attn.o_proj
    assert isinstance(o, OneBitFakeLinear) and all(p.requires_grad for p in o.trainable())
    cfg = DistillConfig(loss="forward", init="onebit", steps=4, seqlen=32, batch_size=2, lr=2e-3,
                        lr_schedule="constant", save_steps=10)
    run = train_student(student, m, _ids(8, 32, seed=3), cfg, tmp_path / "w", progress=False)
    assert run["losses"][-1] < run["losses"][0]
    ids = _ids(2, 32, seed=5)
    with torch.no_grad():
        ref = student(input_ids=ids).logits
    export_student(student, {"method": "bitdistiller", "fmt": None})
    assert student.model.layers[0].self_attn.o_proj.spec["codec"] == "onebit"
    lowbit.save(student, tmp_path / "ck")
    back = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_onebit_student_recipe_tag_names_no_format():
    rec = QuantRecipe.from_dict({"method": "onebit-kd", "fmt": None, "embed": None, "head": None,
                                 "method_config": {"init": "onebit", "loss": "forward", "seqlen": 128, "steps": 60},
                                 "storage": {"dtype": "float16"}, "calib": None})
    assert rec.tag() == "init=onebit-loss=forward-seqlen=128-steps=60"
