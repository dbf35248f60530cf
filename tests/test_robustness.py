"""Unattended-line safety: broken inputs become error rows (never tracebacks), writes are atomic under SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from visualad.cli import main


def _broken_files(tmp_path):
    """name -> file: one per failure kind, next to one good image."""
    d = tmp_path / "inputs"
    d.mkdir()
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(d / "a_good.png")
    (d / "b_empty.png").write_bytes(b"")
    good = (d / "a_good.png").read_bytes()
    (d / "c_truncated.png").write_bytes(good[: len(good) // 2])
    (d / "d_not_an_image.jpg").write_bytes(b"this is text, not a JPEG" * 10)
    Image.new("1", (20000, 20000)).save(d / "e_huge.png")  # ~50 KB on disk, 400 MP decoded
    Image.fromarray(np.ones((4, 4), np.uint8)).save(d / "f_tiny.png")  # valid: 4x4 grey, upsampled
    return d


EXPECTED = {"a_good.png": None, "b_empty.png": "empty", "c_truncated.png": "truncated",
            "d_not_an_image.jpg": "not an image", "e_huge.png": "pixel", "f_tiny.png": None}


def test_cli_turns_every_broken_input_into_an_error_row(tiny_detector, tmp_path, capsys):
    model = tiny_detector.save_pretrained(tmp_path / "m")
    d = _broken_files(tmp_path)
    out = tmp_path / "rows.jsonl"
    code = main(["predict", "--mode", "head", str(d), "--model", str(model), "--device", "cpu", "--out", str(out), "-q"])
    rows = {os.path.basename(r["path"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 2 and set(rows) == set(EXPECTED)
    for name, reason in EXPECTED.items():
        if reason is None:
            assert rows[name]["error"] is None and isinstance(rows[name]["score"], float), name
        else:
            assert reason in rows[name]["error"].lower() and name in rows[name]["error"], (name, rows[name])
            assert rows[name]["score"] is None
    assert "Traceback" not in capsys.readouterr().err


WRITER = textwrap.dedent("""
    import sys, time
    from visualad.atomic import atomic_open
    with atomic_open(sys.argv[1], "wb") as fh:
        for i in range(1000):
            fh.write(b"new" * 10000)
            fh.flush()
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
""")


def test_sigkill_during_an_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_bytes(b"old content\n")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old content\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "results.jsonl"]
    assert all(name.startswith(".results.jsonl.") for name in leftovers)  # only the hidden temporary


def test_sigkill_during_save_pretrained_keeps_the_previous_model_loadable(tiny_detector, tmp_path):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    script = textwrap.dedent(f"""
        import os, signal
        import visualad.atomic as atomic
        def die(src, dst):  # killed after writing the temporary file, before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.replace = die
        from visualad import AnomalyDetector
        det = AnomalyDetector.from_pretrained({str(d)!r}, device="cpu")
        det.config.image_threshold = 123.0
        det.save_pretrained({str(d)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    after = {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".")}
    assert after == before
    from visualad import AnomalyDetector

    assert AnomalyDetector.from_pretrained(d, device="cpu").config.image_threshold is None
