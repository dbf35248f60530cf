"""The README's first run, as a new user runs it: its own command on the shipped example, in a fresh folder,
and what it prints against what the README shows."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "transistor"


def _first_run_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Run it on the example images (offline)"):readme.index("## What it does")]


def _rate_free(line: str) -> str:
    return re.sub(r"\d+(\.\d+)? images/s", "N images/s", line)


def test_the_readme_first_run_decides_every_example_right_and_prints_what_the_readme_shows(tmp_path):
    section = _first_run_section()
    bash, printed = re.findall(r"```(?:bash|text)\n(.*?)```", section, re.S)[:2]
    setup_and_run = bash.strip().split(" && ")
    env, _, cli = setup_and_run[-1].partition(" visualad ")
    assert env == "HF_HUB_OFFLINE=1" and setup_and_run[1] == ". .venv/bin/activate"
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "transistor")  # the command's relative paths, a fresh folder
    proc = subprocess.run([sys.executable, "-m", "visualad", *shlex.split(cli)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "examples-out" / "scores.jsonl").read_text().splitlines()]
    names = [Path(r["path"]).name for r in rows]
    assert sorted(names) == sorted(p.name for p in (EXAMPLE / "test").iterdir())
    assert all(r["mode"] == "references" and r["error"] is None for r in rows)
    # every defect flagged, no good part flagged (the file names say which is which)
    assert {n: r["label"] for n, r in zip(names, rows)} == {n: not n.startswith("good") for n in names}
    assert sorted(p.name for p in (tmp_path / "examples-out" / "overlays").iterdir()) == sorted(names)

    # the README's table: the same scores (fp32 on any CPU: well within 2e-3), labels and region counts
    table = re.findall(r"^\| (\S+\.png) \| ([0-9.]+) \| (anomalous|normal) \| (\d+) \|$", section, re.M)
    assert sorted(t[0] for t in table) == sorted(names)
    by_name = dict(zip(names, rows))
    for name, score, label, regions in table:
        row = by_name[name]
        assert abs(row["score"] - float(score)) < 2e-3, (name, row["score"], score)
        assert row["label"] == (label == "anomalous") and len(row["regions"]) == int(regions)
    threshold = float(re.search(r"\(threshold ([0-9.]+);", section).group(1))
    assert all(abs(r["threshold"] - threshold) < 2e-3 for r in rows)

    # the README's printed lines: what the run printed (its warning and summary; the speed varies)
    said = [_rate_free(line) for line in proc.stderr.splitlines()
            if line.startswith(("visualad predict:", "WARNING"))]
    assert said == [_rate_free(line) for line in printed.strip().splitlines()]
    picture = re.search(r"!\[[^\]]*\]\((docs/images/first-run-[^)]+\.png)\)", section).group(1)
    assert (REPO / picture).is_file()
