"""Output files under hostile input: file names that are spreadsheet formulas, inputs whose outputs would share a
name, output folders that are input folders, ``--resume`` over rows of other settings or over bytes that are not
UTF-8, and an unexpected exception in the CLI (one line and a hint, never a traceback)."""
from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from visualad import cli
from visualad.cli import main


def _save(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((30, 40, 3), value, np.uint8)).save(path)
    return path


def _predict(tiny_model_dir, *args):
    return main(["predict", *map(str, args), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head", "-q"])


def test_formula_file_names_are_neutralised_in_csv_and_read_back_by_resume(tiny_model_dir, tmp_path, capsys,
                                                                            monkeypatch):
    names = ["=HYPERLINK(1).png", "+a.png", "-b.png", "@c.png", "'q.png", "plain.png"]
    folder = tmp_path / "in"
    for i, n in enumerate(names):
        _save(folder / n, 40 * i)
    monkeypatch.chdir(folder)  # the names as given: each row's path starts with the name
    out = tmp_path / "rows.csv"
    opts = ["--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head", "--out", str(out)]
    assert main(["predict", *opts, "-q", "--", *names]) == 0
    with open(out, newline="") as fh:
        cells = {r["path"][1:] if r["path"].startswith("'") else r["path"]: r["path"] for r in csv.DictReader(fh)}
    for n in names[:5]:
        assert cells[n] == "'" + n  # a text cell, not a formula
    assert cells["plain.png"] == "plain.png"
    capsys.readouterr()
    assert main(["predict", *opts, "--resume", "--", *names]) == 0
    assert "6 kept from the earlier run" in capsys.readouterr().err  # every path read back as it was


def test_every_input_gets_its_own_outputs(tiny_model_dir, tmp_path):
    folder = tmp_path / "in"
    for i, n in enumerate(["a.jpg", "a.png", "a.jpg.png", "A.PNG"]):
        _save(folder / n, 50 * i)
    singles = [_save(tmp_path / d / "same.jpg", v) for d, v in (("d1", 10), ("d2", 250))]
    out, ov, maps = tmp_path / "r.jsonl", tmp_path / "ov", tmp_path / "maps"
    assert _predict(tiny_model_dir, folder, *singles, "--out", out, "--overlays", ov, "--save-maps", maps,
                    "--threshold", "0") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and len({r["map_path"] for r in rows}) == 6
    assert len(list(ov.iterdir())) == 6 and len([p for p in maps.iterdir() if p.suffix == ".npy"]) == 6
    by_input = {r["path"]: np.load(r["map_path"]) for r in rows}
    assert len({float(m.sum()) for m in by_input.values()}) == 6  # six different maps, none overwritten


@pytest.mark.parametrize("option", ["--overlays", "--save-maps", "--out"])
def test_outputs_never_replace_an_input(tiny_model_dir, tmp_path, capsys, option):
    folder = tmp_path / "in"
    a, b = _save(folder / "a.png", 10), _save(folder / "b.npy.png", 20)
    before = {p: p.read_bytes() for p in (a, b)}
    target = a if option == "--out" else folder
    extra = ["--out", str(tmp_path / "r.jsonl")] if option != "--out" else []
    assert _predict(tiny_model_dir, folder, option, target, *extra) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("input folder" in err[0] or "is one of the inputs" in err[0]), err
    assert {p: p.read_bytes() for p in (a, b)} == before and sorted(os.listdir(folder)) == ["a.png", "b.npy.png"]
    # a single file next to its own overlay folder: the target would be the input itself
    assert _predict(tiny_model_dir, a, "--overlays", folder, "--out", tmp_path / "r2.jsonl") != 0
    assert "would replace this input" in capsys.readouterr().err and a.read_bytes() == before[a]


@pytest.mark.parametrize("change,differs", [(["--mode", "references", "--references", "REFS"], "mode"),
                                            (["--threshold", "0.5"], "threshold"),
                                            (["--image-size", "28"], "image_size")])
def test_resume_refuses_rows_of_other_settings_and_says_what_differs(tiny_model_dir, tmp_path, capsys, change, differs):
    folder = tmp_path / "in"
    for i in range(3):
        _save(folder / f"{i}.png", 60 * i)
    refs = tmp_path / "refs"
    _save(refs / "r.png", 90)
    out = tmp_path / "r.jsonl"
    base = ["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out), "-q"]
    assert main(base + ["--mode", "head"]) == 0
    first = out.read_bytes()
    args = [str(refs) if a == "REFS" else a for a in change]
    assert main(base + args + (["--mode", "head"] if "--mode" not in args else []) + ["--resume"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and differs in err[0], err
    assert out.read_bytes() == first  # refused before anything was written
    assert main(base + ["--mode", "head", "--resume"]) == 0  # the same settings: kept


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_partial_file_with_bytes_that_are_not_utf8_is_resumed(tiny_model_dir, tmp_path, capsys, fmt):
    folder = tmp_path / "in"
    for i in range(4):
        _save(folder / f"{i}.png", 60 * i)
    out = tmp_path / f"r.{fmt}"
    assert _predict(tiny_model_dir, folder, "--out", out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if fmt == "csv" else ([], lines)
    # rows 0 and 1 survive; then garbage, a NUL line and a row cut short by a kill
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(b"".join(header + rows[:2] + [b"\xff\xfe\x80 not text\n", b"a\x00b\n", rows[2][:20]]))
    out.unlink()
    assert main(["predict", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--resume"]) == 0
    assert "2 kept from the earlier run" in capsys.readouterr().err
    if fmt == "csv":
        with open(out, newline="") as fh:
            paths = [r["path"] for r in csv.DictReader(fh)]
    else:
        paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert sorted(os.path.basename(p) for p in paths) == ["0.png", "1.png", "2.png", "3.png"]


def test_an_unexpected_exception_is_one_line_and_a_hint(capsys, caplog, monkeypatch):
    def broken(args):
        raise RuntimeError("something no one planned for\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["visualad info: unexpected error: RuntimeError: something no one planned for "
                   "(run again with -v for the traceback)"]
    caplog.set_level(logging.DEBUG, logger="visualad.cli")
    assert main(["info", "-v"]) == 1  # the traceback goes to the log
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
