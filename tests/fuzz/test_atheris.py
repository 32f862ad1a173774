"""Run the atheris (libFuzzer) harness of atheris_reader.py for a bounded number of inputs,
seeded with the base journals and the regression corpus. A crash is minimised by libFuzzer
and copied into tests/fuzz/corpus/ as ``none--found-atheris-*.bin``. Skipped, with the
reason, where atheris is not installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import journals
from tests.support import tally

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
RUNS = 150_000 * SOAK
REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).with_name("corpus")
TALLY = tally("fuzzed inputs")


def test_atheris_reader(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    seeds, artifacts = tmp_path / "seeds", tmp_path / "artifacts"
    seeds.mkdir()
    artifacts.mkdir()
    for name, base in journals.BASES.items():
        (seeds / name).write_bytes(base.data)
    for p in CORPUS.glob("*.bin"):
        (seeds / p.name).write_bytes(p.read_bytes())
    cmd = [sys.executable, "-m", "tests.fuzz.atheris_reader", f"-runs={RUNS}", "-seed=1"]
    cmd += ["-max_len=8192", f"-artifact_prefix={artifacts}/", str(seeds)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    done = re.search(r"Done (\d+) runs", r.stderr)
    runs = int(done.group(1)) if done else 0
    TALLY.cases += runs
    TALLY.parts["reader, atheris"] = TALLY.parts.get("reader, atheris", 0) + runs
    crashes = sorted(artifacts.iterdir())
    for crash in crashes:
        small = tmp_path / "min"
        minimise = [*cmd[:3], "-minimize_crash=1", "-runs=10000"]
        minimise += [f"-exact_artifact_path={small}", str(crash)]
        subprocess.run(minimise, cwd=REPO, capture_output=True)
        data = (small if small.exists() else crash).read_bytes()
        known = [p for p in CORPUS.glob("*.bin") if p.read_bytes() == data]
        keep = known[0] if known else CORPUS / f"none--found-atheris-{crash.name}.bin"
        keep.write_bytes(data)
        TALLY.violations.append(f"atheris: {crash.name} (kept as {keep})")
    assert r.returncode == 0 and not crashes, r.stderr[-3000:]
    assert runs == RUNS, r.stderr[-3000:]
