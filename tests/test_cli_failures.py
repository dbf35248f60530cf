"""The bad-input corpus for the command line: nothing lost (streamed rows, --resume after SIGKILL, SIGTERM like
Ctrl-C, an overlay that cannot be written fails one row), names that cannot collide, and every failure a
single line on stderr with a non-zero exit code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from visualad.cli import main


def _folder(tmp_path, n=6, name="imgs"):
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    return d


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_killed(tiny_model_dir, folder, out, after_rows, sig):
    """Run predict in a child that sends itself ``sig`` once ``after_rows`` rows are written."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import visualad.rows as rows
        real = rows.RowWriter.write
        def write(self, row):
            real(self, row)
            write.n = getattr(write, "n", 0) + 1
            if write.n == {after_rows}:
                os.kill(os.getpid(), {int(sig)})
        rows.RowWriter.write = write
        from visualad.cli import main
        sys.exit(main(["predict", {str(folder)!r}, "--model", {str(tiny_model_dir)!r}, "--device", "cpu",
                       "--mode", "head", "--out", {str(out)!r}, "--batch-size", "2", "-q"]))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def test_sigkill_then_resume_gives_every_input_exactly_once(tiny_model_dir, tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out" / "rows.jsonl"
    proc = _run_killed(tiny_model_dir, folder, out, after_rows=3, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    partial = _rows(out.with_name("rows.jsonl.partial"))
    assert len(partial) == 3  # streamed: what was done before the kill is on disk
    assert main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--resume", "-q"]) == 0
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.iterdir())
    assert rows[:3] == partial  # kept as they were, not scored again
    assert not out.with_name("rows.jsonl.partial").exists()
    # a changed input is scored again on the next --resume; the others are kept
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "img_0.png")
    os.utime(folder / "img_0.png", ns=(1, 1))
    assert main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--resume", "-q"]) == 0
    again = {r["path"]: r for r in _rows(out)}
    assert len(again) == 6 and again[str(folder / "img_0.png")]["file_mtime_ns"] == 1
    fresh = {r["path"]: r for r in rows}
    assert all(again[p] == fresh[p] for p in fresh if not p.endswith("img_0.png"))


def test_sigterm_stops_like_ctrl_c_and_keeps_a_resumable_file(tiny_model_dir, tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "rows.jsonl"
    proc = _run_killed(tiny_model_dir, folder, out, after_rows=2, sig=signal.SIGTERM)
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines()[-1] == "visualad: terminated" and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("rows", ".rows"))) == \
        ["rows.jsonl.partial"]  # no stray temporary file, only the resumable one
    assert main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--resume", "-q"]) == 0
    assert len(_rows(out)) == 6


def test_an_overlay_that_cannot_be_written_fails_its_row_only(tiny_model_dir, tmp_path, capsys):
    folder = _folder(tmp_path, n=2)
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "sub" / "c.png")
    ov = tmp_path / "ov"
    ov.mkdir()
    (ov / "sub").write_text("a file where the overlay folder should be")
    out = tmp_path / "rows.jsonl"
    code = main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--overlays", str(ov), "-q"])
    assert code == 2
    rows = {os.path.basename(r["path"]): r for r in _rows(out)}
    assert "not written" in rows["c.png"]["error"] and rows["img_0.png"]["error"] is None
    assert (ov / "img_0.png").is_file() and (ov / "img_1.png").is_file()
    assert "1 of 3 inputs failed" in capsys.readouterr().err


def test_overlays_of_inputs_that_share_a_name_do_not_overwrite_each_other(tiny_model_dir, tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(folder / "a.jpg")
    Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(folder / "b.png")
    ov = tmp_path / "ov"
    assert main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(tmp_path / "r.jsonl"), "--overlays", str(ov), "-q"]) == 0
    assert sorted(p.name for p in ov.iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]


@pytest.mark.parametrize("case", ["out under a file", "overlays under a file", "empty folder", "empty references",
                                  "resume without out", "cuda without cuda"])
def test_cli_failures_are_one_line_and_non_zero(tiny_model_dir, tmp_path, capsys, case):
    folder = _folder(tmp_path, n=2)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    args = ["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head", "-q"]
    expect = {"out under a file": "afile", "overlays under a file": "afile", "empty folder": "no images found",
              "empty references": "no images found", "resume without out": "--resume needs --out",
              "cuda without cuda": "cuda"}[case]
    if case == "out under a file":
        args += ["--out", str(tmp_path / "afile" / "rows.jsonl")]
    elif case == "overlays under a file":
        args += ["--out", str(tmp_path / "r.jsonl"), "--overlays", str(tmp_path / "afile" / "ov")]
    elif case == "empty folder":
        args[1] = str(tmp_path / "empty")
    elif case == "empty references":
        args += ["--references", str(tmp_path / "empty"), "--mode", "references"]
    elif case == "resume without out":
        args += ["--resume"]
    else:
        args[args.index("--device") + 1] = "cuda:7"
    code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0, case
    assert len(err) == 1 and expect in err[0] and err[0].startswith("visualad"), (case, err)
