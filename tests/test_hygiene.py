"""The project speaks of itself only: no machine paths and no words about how the work was organised.

Scanned: src/, docs/, benchmarks/ (scripts, studies, committed results) and README.md, every text file.
CHANGELOG.md is the one place where dated history may name how the work went.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["src", "docs", "benchmarks", "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".log", ".sh", ".cfg", ".yaml", ".yml", ".csv", ".html"}

# An absolute home, temp or work-machine path: /root/..., /home/..., /tmp/x..., /work/... (not the tail of a URL).
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:root|home|work)/|(?<![\w.~-])/tmp/\w")
# Words about how the work was organised: "sitting(s)", "issue 4", "issues 3-5", "issue-4", "issue #29".
WORK_WORDS = re.compile(r"\bsittings?\b|\bissues?[\s-]*#?\d+", re.IGNORECASE)


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        p = ROOT / name
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [f for f in files if f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts]


def hits(pattern: re.Pattern, text: str) -> list[str]:
    return [f"{text.count(chr(10), 0, m.start()) + 1}: {text[max(0, m.start() - 30):m.end() + 30]!r}"
            for m in pattern.finditer(text)]


def test_the_scan_sees_the_tree():
    names = {f.relative_to(ROOT).as_posix() for f in scanned_files()}
    assert "README.md" in names and "src/quantdream/train.py" in names
    assert any(n.startswith("benchmarks/results/") and n.endswith(".json") for n in names)


@pytest.mark.parametrize("text, bad", [
    ("runs in /root/qd-runs/x", True), ("--workdir /tmp/quantdream-bench", True), ("see /home/me/a", True),
    ("export_dir: /work/main/src", True), ("https://example.org/work/x and a/tmp/b", False),
    ("the ninth sitting", True), ("Sittings", True), ("sitting_limit", False), ("(issue 5)", True),
    ("issue-4 search", True), ("issues 3-5", True), ("an issue #29", True), ("the issue tracker", False),
])
def test_patterns(text, bad):
    assert bool(hits(MACHINE_PATH, text) or hits(WORK_WORDS, text)) is bad


def test_no_machine_paths_or_work_words():
    found = {}
    for f in scanned_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        h = hits(MACHINE_PATH, text) + hits(WORK_WORDS, text)
        if h:
            found[f.relative_to(ROOT).as_posix()] = h[:3] + ([f"... {len(h) - 3} more"] if len(h) > 3 else [])
    assert not found, "machine paths or work words:\n" + "\n".join(f"{k}: {v}" for k, v in found.items())
