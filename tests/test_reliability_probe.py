"""The reliability probe (scripts/reliability_probe.py): 99 cases with unique ids, each with what it expects and
a check; two of its cheapest cases run for real, and its report rewrites only its own part of the markdown."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "reliability_probe.py"


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reliability_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_99_cases_each_with_an_expectation_and_a_check(rp):
    ids = [c.id for c in rp.CASES]
    assert len(ids) == 99 and len(set(ids)) == 99
    for c in rp.CASES:
        assert c.description.strip() and c.expected.strip(), c.id
        assert callable(c.check) and c.category in rp.CATEGORIES, c.id


def test_cheap_cases_run_and_report(rp, tmp_path):
    probe = rp.Probe(tmp_path / "scratch")
    by_id = {c.id: c for c in rp.CASES}
    results = [rp.run_case(probe, by_id[i]) for i in ("f19", "f20")]  # a missing model path, an unknown pull
    for r in results:
        assert r["pass"], r
        assert r["got"].startswith("exit 2: lowbit: error:") and "Traceback" not in r["got"], r

    md, js = tmp_path / "reliability.md", tmp_path / "probe.json"
    md.write_text("# Reliability\n\nkept text\n")
    for _ in range(2):  # a rerun replaces the table, keeping the text around it
        rp.write_reports(results, {"command": rp.COMMAND}, js, md)
    text = md.read_text()
    assert text.startswith("# Reliability\n\nkept text") and text.count("| case | expected | got | pass |") == 1
    assert "**2 of 2 pass.**" in text
    doc = rp.strict_json(js)
    assert doc["passed"] == doc["total"] == 2 and [c["id"] for c in doc["cases"]] == ["f19", "f20"]
    with pytest.raises(ValueError):
        (tmp_path / "inf.json").write_text(json.dumps({"ppl": float("inf")}))
        rp.strict_json(tmp_path / "inf.json")
