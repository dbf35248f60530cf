"""The visualad command end to end with a tiny model: JSONL rows, overlays, exit codes, calibrate, eval, info."""
from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest
from conftest import require
from PIL import Image

from visualad.cli import main


@pytest.fixture
def image_tree(shared_data, tmp_path):
    """Real images in nested folders, plus one broken file."""
    root = tmp_path / "imgs"
    src = shared_data / "mvtec_ad_reduced/hazelnut/test"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    shutil.copy(src / "crack/000.png", root / "a" / "crack0.png")
    shutil.copy(src / "good/000.png", root / "b" / "good0.png")
    shutil.copy(shared_data / "lookout_cookies/cookie/test/good/normal-11.jpg", root / "b" / "c" / "cookie.jpg")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_folder_writes_rows_overlays_and_reports_the_broken_file(tiny_model_dir, image_tree, tmp_path, capsys):
    out, ov = tmp_path / "r.jsonl", tmp_path / "ov"
    code = main(["predict", "--mode", "head", str(image_tree), "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
                 "--overlays", str(ov), "--batch-size", "2", "--quiet"])
    assert code == 2  # one input failed
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(image_tree / p) for p in
                                         ("a/crack0.png", "b/broken.png", "b/c/cookie.jpg", "b/good0.png")]
    broken = rows[1]
    assert broken["score"] is None and "broken.png" in broken["error"]
    for r in (rows[0], rows[2], rows[3]):
        assert r["error"] is None and isinstance(r["score"], float) and r["label"] is None
    w, h = Image.open(ov / "a" / "crack0.png").size
    assert w == 256 and h > 256  # the image, then its legend strip
    w, h = Image.open(ov / "b" / "c" / "cookie.png").size
    assert w == 576 and h > 768
    assert not (ov / "b" / "broken.png").exists()
    err = capsys.readouterr().err
    assert "1 of 4 inputs failed" in err and "Traceback" not in err


def test_predict_globs_and_files(tiny_model_dir, image_tree, tmp_path):
    out = tmp_path / "g.jsonl"
    code = main(["predict", "--mode", "head", str(image_tree / "**" / "*.jpg"), str(image_tree / "a" / "crack0.png"),
                 "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out), "-q"])
    assert code == 0
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(image_tree / "b/c/cookie.jpg"), str(image_tree / "a/crack0.png")]
    # without overlays no full-size map is made, yet the rows give each input's own size
    assert [(r["height"], r["width"]) for r in rows] == [(768, 576), (256, 256)]


def test_missing_inputs_fail_fast_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import visualad

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(visualad.AnomalyDetector, "from_pretrained", no_model)
    (tmp_path / "here.png").write_bytes(b"x")
    for argv in (["predict", str(tmp_path / "here.png"), str(tmp_path / "nope.png"), str(tmp_path / "no*.jpg")],
                 ["predict", str(tmp_path / "here.png"), "--references", str(tmp_path / "refs")],
                 ["eval", str(tmp_path / "dataset")], ["calibrate", str(tmp_path / "good"), "--out", str(tmp_path)]):
        assert main(argv + ["--model", "no-such-model"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no such file or folder" in err[0], err
        assert str(tmp_path / "here.png") not in err[0] and ("nope.png" in err[0] or "refs" in err[0]
                                                             or "dataset" in err[0] or "good" in err[0])


def test_an_unreadable_input_is_an_error_row_not_a_traceback(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code = main(["predict", "--mode", "head", str(tmp_path / "broken.png"), "--model", str(tiny_model_dir),
                 "--device", "cpu", "--out", str(out), "-q"])
    assert code == 2
    [row] = _rows(out)
    assert "broken.png" in row["error"]


def test_broken_links_in_a_folder_are_error_rows_and_the_run_goes_on(tiny_model_dir, tmp_path, capsys):
    """A dangling link and a link loop by an image's name, in the folder and named on the command line: each
    gets its own error row (they were dropped from a folder, and a loop on the command line stopped the run)."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (20, 16), (120, 60, 30)).save(folder / "ok.png")
    try:
        os.symlink(tmp_path / "gone.png", folder / "dangling.png")
        os.symlink("loop.png", folder / "loop.png")
    except (OSError, NotImplementedError):
        require(False, "symlinks not supported here")
    out = tmp_path / "rows.jsonl"
    code = main(["predict", "--mode", "head", str(folder), str(folder / "loop.png"), "--model", str(tiny_model_dir),
                 "--device", "cpu", "--out", str(out), "--overlays", str(tmp_path / "ov"), "-q"])
    assert code == 2
    rows = {Path(r["path"]).name + ("" if i < 3 else " (named)"): r for i, r in enumerate(_rows(out))}
    assert sorted(rows) == ["dangling.png", "loop.png", "loop.png (named)", "ok.png"]
    assert rows["ok.png"]["error"] is None and rows["ok.png"]["height"] == 16
    assert "file not found" in rows["dangling.png"]["error"]
    assert all("symbolic links" in rows[k]["error"] for k in ("loop.png", "loop.png (named)"))
    assert [p.name for p in (tmp_path / "ov").iterdir()] == ["ok.png"]


def test_a_run_that_stops_before_its_first_row_leaves_earlier_rows_alone(tiny_model_dir, tmp_path, capsys):
    """The partial file starts with the first row: a device that is not there (the model never scores) neither
    empties an earlier run's resumable rows nor asks for --resume."""
    Image.new("RGB", (20, 16)).save(tmp_path / "a.png")
    out = tmp_path / "rows.jsonl"
    partial = tmp_path / "rows.jsonl.partial"
    partial.write_text('{"path": "earlier"}\n')
    argv = ["predict", "--mode", "head", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(argv + ["--device", "tpu"]) == 1
    err = capsys.readouterr().err
    assert "not a device name" in err and "--resume" not in err
    assert partial.read_text() == '{"path": "earlier"}\n' and not out.exists()
    partial.unlink()
    assert main(argv + ["--device", "tpu"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "tiny-model"]  # nothing half written
    assert main(["predict", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 1
    assert "--out is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["predict", "x.png", "--threshold", "nan"],
                                  ["predict", "x.png", "--threshold", "inf"],
                                  ["serve", "--max-upload-mb", "nan"], ["serve", "--max-upload-mb", "-1"],
                                  ["serve", "--max-decode-mp", "inf"], ["serve", "--max-latency-ms", "nan"],
                                  ["finetune", "aux", "--out", "o", "--lr", "nan"]])
def test_numbers_that_would_turn_a_bound_off_are_refused_by_the_parser(argv, capsys):
    from visualad.cli import build_parser

    with pytest.raises(SystemExit) as exc:  # the parser alone: accepted, `serve` would run until stopped
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_calibrate_then_predict_gives_labels(tiny_model_dir, shared_data, tmp_path, capsys):
    cat = shared_data / "mvtec_ad_reduced/hazelnut"
    code = main(["calibrate", str(cat / "train/good"), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path / "cal"), "-q", "--mode", "head"])
    assert code == 0
    cfg = json.loads((tmp_path / "cal" / "config.json").read_text())
    assert cfg["image_threshold"] is not None and cfg["pixel_threshold"] is not None
    out = tmp_path / "r2.jsonl"
    assert main(["predict", "--mode", "head", str(cat / "test"), "--model", str(tmp_path / "cal"), "--device", "cpu",
                 "--out", str(out), "-q"]) == 0
    rows = _rows(out)
    assert len(rows) == 10 and all(isinstance(r["label"], bool) and r["mode"] == "head" for r in rows)
    assert all(r["threshold"] == cfg["image_threshold"] for r in rows)


def test_eval_writes_a_report_with_both_classes(tiny_model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["eval", str(shared_data / "mvtec_ad_reduced"), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(out), "-q"])
    assert code == 0
    report = json.loads(out.read_text())
    assert sorted(report["classes"]) == ["hazelnut", "transistor"]
    for row in report["classes"].values():
        assert row["n_images"] == 10 and row["n_anomalous"] == 8
        for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert 0.0 <= row[key] <= 1.0
    assert set(report["mean"]) >= {"image_auroc", "pixel_auroc", "pixel_aupro"}
    table = capsys.readouterr().out
    assert "hazelnut" in table and "mean" in table


def test_bad_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"x")
    code = main(["predict", str(tmp_path / "x.png"), "--model", "no-such-model", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0] and "known models" in err[0] and "dinov2-s-imgfocus" in err[0]


def test_console_entry_points():
    help_text = subprocess.run([sys.executable, "-m", "visualad", "predict", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--overlays" in help_text and "--threshold" in help_text
    info = subprocess.run([sys.executable, "-m", "visualad", "info"], capture_output=True, text=True, check=True)
    assert "dinov2-s-imgfocus (default)" in info.stdout and "clip-l -> clip-l-visa" in info.stdout


def _reference_block():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    block = guide.split("## Command line reference", 1)[1].split("```", 2)[1]
    sections, current = {}, None
    for line in block.splitlines():
        if line.startswith("visualad "):
            current = line.split()[1]
            sections[current] = ""
        if current:
            sections[current] += line + "\n"
    return sections


def _subcommands():
    from visualad.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_the_user_guide_lists_every_subcommand_and_option():
    sections = _reference_block()
    missing = []
    for name, p in _subcommands().items():
        if name not in sections:
            missing.append(f"visualad {name}")
            continue
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and longs[0] != "--help" and not any(o in sections[name] for o in action.option_strings):
                missing.append(f"visualad {name} {longs[0]}")
    assert not missing, f"missing from the user guide's command line reference: {missing}"


def test_every_help_shows_its_defaults():
    import argparse

    silent = []
    for name, p in _subcommands().items():
        for action in p._actions:
            if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                    or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))):
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{name} {action.option_strings[0]} (default {action.default!r})")
    assert not silent, f"options whose --help does not say their default: {silent}"
