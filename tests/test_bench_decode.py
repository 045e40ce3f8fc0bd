"""bench-decode's llama.cpp rows: EOS masked through llama-cpp-python's LogitsProcessorList, rows named by
where they were timed (llama-cpp-python or llama-bench)."""
import os
import sys
import types

import numpy as np
import pytest

from lowbit.bench.decode import _bench_llama_cpp, _llama_cpp_row, write_decode_report

EOS = 2  # the SPM default, also written to the tiny GGUF


def _tiny_gguf(path, vocab: int = 32, dim: int = 256, ff: int = 256, heads: int = 4):
    """A one-block llama GGUF (F32) whose greedy next token is always EOS.

    Every token embeds to about ``e0`` and the block adds little to it, so the final hidden state points
    along ``e0``; the head row of EOS is ``2 e0`` and every other row is at most ``e0``. With EOS masked the
    greedy pick is some other token."""
    import gguf

    g = np.random.default_rng(0)
    e0 = np.zeros(dim, np.float32)
    e0[0] = 1.0

    def small(*shape):
        return (g.standard_normal(shape) * 0.01).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab))])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([int(gguf.TokenType.UNKNOWN), *[int(gguf.TokenType.CONTROL)] * 2,
                       *[int(gguf.TokenType.NORMAL)] * (vocab - 3)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(EOS)
    head = np.outer(np.linspace(0.1, 1.0, vocab), e0).astype(np.float32)
    head[EOS] = 2 * e0
    tensors = {"token_embd.weight": np.tile(e0, (vocab, 1)) + small(vocab, dim),
               "output_norm.weight": np.ones(dim, np.float32), "output.weight": head,
               "blk.0.attn_norm.weight": np.ones(dim, np.float32), "blk.0.ffn_norm.weight": np.ones(dim, np.float32),
               "blk.0.ffn_gate.weight": small(ff, dim), "blk.0.ffn_up.weight": small(ff, dim),
               "blk.0.ffn_down.weight": small(dim, ff)}
    tensors.update({f"blk.0.attn_{n}.weight": small(dim, dim) for n in ("q", "k", "v", "output")})
    for name, data in tensors.items():  # numpy shapes (rows, cols); GGUF lists them fastest-first
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------ without llama-cpp-python (runs everywhere)

def _fake_llama_cpp(monkeypatch, apply_processors: bool = True):
    """A ``llama_cpp`` module whose ``Llama`` samples as llama-cpp-python 0.3.x does: its sampler callback
    runs each entry of ``logits_processor`` in turn on the vocabulary's logits (in token order), then picks
    the greedy token. The raw logits favour EOS, then token 7."""
    mod = types.ModuleType("llama_cpp")

    class LogitsProcessorList(list):  # as llama_cpp.LogitsProcessorList
        def __call__(self, input_ids, scores):
            for processor in self:
                scores = processor(input_ids, scores)
            return scores

    class Llama:
        def __init__(self, model_path, **kw):
            self.model_path, self.kw = model_path, kw
            self.processors = []  # logits_processor of each generate call
            self.sampled = []  # the logits each token was picked from
            mod.made.append(self)

        def token_eos(self):
            return EOS

        def reset(self):
            pass

        def generate(self, tokens, top_k, temp, reset, logits_processor):
            self.processors.append(logits_processor)
            ids = np.asarray(tokens, dtype=np.intc)
            while True:
                logits = np.zeros(16, np.float32)
                logits[EOS], logits[7] = 10.0, 5.0
                if apply_processors:
                    for processor in logits_processor:  # a bare function fails here, as in llama-cpp-python
                        logits[:] = processor(ids, logits)
                self.sampled.append(logits.copy())
                tok = int(logits.argmax())
                ids = np.append(ids, tok)
                yield tok

    mod.LogitsProcessorList, mod.Llama, mod.made = LogitsProcessorList, Llama, []
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    return mod


def test_llama_cpp_row_masks_eos_through_a_logits_processor_list(monkeypatch, tmp_path):
    fake = _fake_llama_cpp(monkeypatch)
    row = _llama_cpp_row("tiny", "F32", _tiny_gguf(tmp_path / "tiny.gguf"), [1, 5], new_tokens=5, repeats=2,
                         threads=1)
    (llm,) = fake.made
    assert llm.kw["n_threads"] == 1 and llm.kw["n_ctx"] >= 2 + 5 + 8
    assert len(llm.processors) == 3  # warm-up and two timed runs
    for lp in llm.processors:
        assert isinstance(lp, fake.LogitsProcessorList) and callable(lp) and all(callable(p) for p in lp)
    assert len(llm.sampled) == 8 + 2 * 5  # exactly the asked tokens per run
    assert all(s[EOS] == -np.inf for s in llm.sampled)
    assert all(int(s.argmax()) == 7 for s in llm.sampled)
    assert row["engine"] == "llama.cpp" and row["loop"] == "llama-cpp-python" and row["config"] == "F32"
    assert row["bpw"] == 32.0 and len(row["times_s"]) == 2


def test_llama_cpp_row_refuses_a_run_that_made_eos(monkeypatch, tmp_path):
    _fake_llama_cpp(monkeypatch, apply_processors=False)
    with pytest.raises(RuntimeError, match=r"generated EOS \(token 2\) on tiny.gguf"):
        _llama_cpp_row("tiny", "F32", _tiny_gguf(tmp_path / "tiny.gguf"), [1, 5], new_tokens=5, repeats=1,
                       threads=1)


def test_decode_report_names_where_llama_cpp_rows_come_from(tmp_path):
    row = {"model": "m", "engine": "llama.cpp", "bpw": 4.5, "tok_s": 10.0, "times_s": [1.0]}
    rows = [{**row, "config": "python", "loop": "llama-cpp-python"},
            {**row, "config": "bench", "loop": "llama-bench", "llama_cpp_build": "abc"},
            {**row, "config": "old-python"},  # rows written before rows named their loop
            {**row, "config": "old-bench", "llama_cpp_build": "abc"},
            {**row, "engine": "lowbit", "config": "old-lowbit"}]
    env = {"new_tokens": 1, "prompt": "p", "repeats": 1, "threads": 1, "torch": "t", "llama_cpp": None,
           "loadavg_before": [0, 0, 0], "loadavg_after": [0, 0, 0], "date": "d"}
    md = tmp_path / "decode.md"
    write_decode_report({"rows": rows, "env": env}, tmp_path / "decode.json", md)
    loops = {line.split(" | ")[3]: line.split(" | ")[2] for line in md.read_text().splitlines()
             if line.startswith("| m |")}
    assert loops == {"python": "llama-cpp-python", "bench": "llama-bench", "old-python": "llama-cpp-python",
                     "old-bench": "llama-bench", "old-lowbit": "hf generate"}


# ------------------------------------------------------------ with llama-cpp-python (the bench extra)

def test_llama_cpp_rows_with_llama_cpp_python(monkeypatch, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (pip install lowbit[bench]) is not installed; the fake-Llama "
                            "tests above cover the row path without it")
    if not os.environ.get("LOWBIT_LLAMA_CHILD"):
        # llama.cpp runs native code that can crash the interpreter: run this test in a child process, so a
        # crash fails this test (with its output) instead of ending the whole session
        import subprocess

        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"{__file__}::test_llama_cpp_rows_with_llama_cpp_python"],
                           env={**os.environ, "LOWBIT_LLAMA_CHILD": "1"}, capture_output=True, text=True)
        assert r.returncode == 0, f"exit {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
        return
    import lowbit.bench.decode as decode

    f32 = _tiny_gguf(tmp_path / "tiny-F32.gguf")
    raw = llama_cpp.Llama(model_path=str(f32), n_ctx=64, n_threads=1, verbose=False)
    assert raw.token_eos() == EOS
    unmasked = raw.generate([1, 5], top_k=1, temp=0.0, reset=True)
    assert next(unmasked) == EOS  # so a row only succeeds with EOS masked
    del unmasked, raw

    monkeypatch.setattr(decode, "_llama_f32", lambda name: (tmp_path, f32))
    rows = _bench_llama_cpp("tiny", [1, 5], new_tokens=16, repeats=2, threads=1, progress=False)
    assert [r["config"] for r in rows] == list(decode.DEFAULT_LLAMA_QUANTS)
    assert all(r["engine"] == "llama.cpp" and r["loop"] == "llama-cpp-python" for r in rows)
    assert all(len(r["times_s"]) == 2 and r["tok_s"] > 0 for r in rows)
    assert rows[0]["bpw"] == 32.0 and all(r["bpw"] < 32.0 for r in rows[1:])


def test_unknown_llama_quant_is_refused_before_any_work():
    from lowbit.bench.decode import bench_decode
    from lowbit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"llama.cpp quants \['Q5_X'\]: use F32 or Q8_0, Q4_K_M, Q3_K_M, Q2_K"):
        bench_decode(models=["no-such-model"], llama_quants=["Q4_K_M", "Q5_X"])
