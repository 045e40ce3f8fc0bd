"""Committed text is clean: no merge-conflict markers left in docs, sources, tests or recipes."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.M)


def test_no_merge_conflict_markers():
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py"),
             *(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "recipes").rglob("*.yaml")]
    bad = [f"{p.relative_to(ROOT)}:{s.count(chr(10), 0, m.start()) + 1}"
           for p in files if p.is_file() for s in [p.read_text(errors="replace")] for m in MARKER.finditer(s)]
    assert not bad, f"merge-conflict markers left in: {bad}"


def test_the_marker_pattern_catches_markers():
    assert MARKER.search("text\n<<<<<<< HEAD\nx\n") and MARKER.search(">>>>>>> branch\n")
    assert not MARKER.search("==================  ====\n")
