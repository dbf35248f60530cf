"""Operating points: the false-alarm threshold and its bound hold on score distributions with known rates
(simulations), calibration scores are out of sample, and the chosen point is stated where users look."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from visualad.operating import beta_quantile, describe_threshold, false_alarm_threshold, recall_threshold

DISTRIBUTIONS = {  # (draw n scores, the true rate of a threshold: P(score >= t))
    "normal": (lambda rng, n: rng.standard_normal(n), lambda t: stats.norm.sf(t)),
    "exponential": (lambda rng, n: rng.exponential(2.0, n), lambda t: math.exp(-max(t, 0.0) / 2.0)),
    "uniform": (lambda rng, n: rng.uniform(-1, 3, n), lambda t: min(1.0, max(0.0, (3 - t) / 4))),
}


def test_beta_quantile_matches_scipy():
    for a, b, q in ((1, 10, 0.95), (3, 48, 0.95), (12, 300, 0.95), (5, 5, 0.5), (1, 1, 0.9)):
        assert abs(beta_quantile(a, b, q) - stats.beta.ppf(q, a, b)) < 1e-9


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n,rate", [(50, 0.05), (200, 0.01), (30, 0.1)])
def test_the_false_alarm_rate_and_its_bound_hold_whatever_the_distribution(dist, n, rate):
    """2000 calibrations on fresh normal scores: the true rate of the threshold averages its expected rate
    (<= the rate asked), and exceeds the 95% bound in about 5% of them (binomial error: 3 sigma)."""
    draw, true_rate = DISTRIBUTIONS[dist]
    rng = np.random.default_rng(hash((dist, n)) % 2**32)
    trials = 2000
    rates, over, expected = [], 0, None
    for _ in range(trials):
        point = false_alarm_threshold(draw(rng, n), rate)
        r = true_rate(point.threshold)
        rates.append(r)
        over += r > point.rate_bound
        expected = point.expected_rate
    assert expected <= rate
    sd = math.sqrt(rate * (1 - rate) / n / trials) * 3 + 1e-3
    assert abs(np.mean(rates) - expected) < sd, (np.mean(rates), expected)
    assert over / trials < 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_too_few_normals_for_the_rate_is_said_and_the_threshold_stays_above_them():
    scores = np.arange(10.0)
    point = false_alarm_threshold(scores, 0.01)
    assert point.threshold > scores.max() and point.calibration_rate == 0.0
    assert "needs at least 99" in point.warning and abs(point.expected_rate - 1 / 11) < 1e-12
    assert "9.1%" in point.describe()


def test_a_threshold_between_scores_is_described_conservatively():
    normal = np.arange(1.0, 11.0)  # 1..10
    on = describe_threshold("f1", 9.0, normal)  # the 9th smallest: of 11, 2 rank at or above it
    between = describe_threshold("f1", 8.5, normal)  # 8 lie below: at most 3 of 11
    assert on.expected_rate == 2 / 11 and between.expected_rate == 3 / 11 and on.exact and not between.exact
    assert "false alarms expected 18%" in on.describe() and "expected at most 27%" in between.describe()
    assert abs(on.rate_bound - stats.beta.ppf(0.95, 2, 9)) < 1e-9  # Beta(n + 1 - k, k), k = 9
    assert abs(between.rate_bound - stats.beta.ppf(0.95, 3, 8)) < 1e-9
    high = recall_threshold(normal, [5.0, 12.0, 20.0, 30.0], 0.75)  # flag the 3 highest of 4
    assert high.threshold == 12.0 and high.recall == 0.75 and high.expected_rate == 1 / 11


def test_calibration_scores_are_out_of_sample_and_the_point_is_stated(tiny_detector, tmp_path, capsys):
    """Calibrating references mode on the references themselves: each is scored against the others (its own
    patches would give 0), equal to a bank built without it; the model keeps every candidate point."""
    from visualad import AnomalyDetector
    from visualad.cli import main

    tiny_detector.to("cpu", "fp32")
    rng = np.random.default_rng(3)
    normals = [rng.integers(60, 200, (56, 56, 3), dtype=np.uint8) for _ in range(5)]
    tiny_detector.set_references(normals)
    got = tiny_detector.calibrate(normals, mode="references", false_alarm_rate=0.2)
    held_out = []
    for i in range(5):
        other = AnomalyDetector(tiny_detector.model, device="cpu", dtype="fp32")
        other.set_references([x for j, x in enumerate(normals) if j != i])
        held_out.append(other.predict(normals[i], mode="references").pred_score)
    assert min(held_out) > 0.05  # far from the 0 of an image against itself
    np.testing.assert_allclose(got["normal_scores"], sorted(held_out), atol=1e-5)
    assert got["operating_point"]["name"] == "false_alarm" and set(got["operating_points"]) == {"false_alarm",
                                                                                               "percentile"}
    model = tiny_detector.save_pretrained(tmp_path / "m")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(normals[0]).save(img)
    assert main(["predict", str(img), "--model", str(model), "--device", "cpu", "--dtype", "fp32",
                 "--out", str(tmp_path / "r.jsonl")]) == 0
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["operating_point"].startswith("threshold for 20% false alarms, calibrated on 5 references, each "
                                             "scored against the others")
    assert row["operating_point"] in capsys.readouterr().err


def test_the_cli_reports_every_point_and_keeps_the_one_named(tiny_detector, tmp_path, capsys):
    from PIL import Image

    from visualad import AnomalyDetector
    from visualad.cli import main

    rng = np.random.default_rng(4)
    for folder, n, lo, hi in (("good", 12, 90, 130), ("bad", 6, 0, 256)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(lo, hi, (56, 56, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    model = tiny_detector.save_pretrained(tmp_path / "m")
    assert main(["calibrate", str(tmp_path / "good"), "--model", str(model), "--out", str(tmp_path / "c"),
                 "--device", "cpu", "--mode", "head", "--anomalous", str(tmp_path / "bad"), "--false-alarm-rate",
                 "0.1", "--target-recall", "0.5", "--operating-point", "recall", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = {line.split(":")[0].strip(" *"): line.startswith(" *") for line in lines[1:]}
    assert marked == {"percentile": False, "false_alarm": False, "f1": False, "recall": True}
    assert all("recall" in line and "calibrated on 12 normals" in line for line in lines[1:])
    stats = AnomalyDetector.from_pretrained(tmp_path / "c", device="cpu").config.score_stats
    assert stats["operating_point"]["name"] == "recall" and stats["operating_point"]["recall"] >= 0.5
    assert main(["calibrate", str(tmp_path / "good"), "--model", str(model), "--out", str(tmp_path / "d"),
                 "--device", "cpu", "--operating-point", "recall"]) == 1  # needs anomalous images
    assert "operating point 'recall' needs anomalous images" in capsys.readouterr().err


def test_references_set_their_own_threshold_unless_one_holds_for_them(tiny_detector, tiny_model_dir, tmp_path,
                                                                      capsys):
    """``set_references(calibrate=True)`` is ``calibrate(refs, mode="references", false_alarm_rate=0.05)`` on the
    references themselves (leave-one-out); a calibration that holds for the same references is kept. ``predict
    --references`` labels rows that way; ``--threshold`` or a mode that does not use the references leaves it."""
    from PIL import Image

    from visualad.cli import main

    tiny_detector.to("cpu", "fp32")
    rng = np.random.default_rng(5)
    normals = [rng.integers(60, 200, (56, 56, 3), dtype=np.uint8) for _ in range(6)]
    tiny_detector.set_references(normals)
    want = tiny_detector.calibrate(normals, mode="references", false_alarm_rate=0.05)["image_threshold"]
    config = tiny_detector.config
    config.image_threshold = config.pixel_threshold = config.score_stats = None

    tiny_detector.set_references(normals, calibrate=True)
    point = config.score_stats["operating_point"]
    assert config.image_threshold == pytest.approx(want, abs=1e-6) and point["name"] == "false_alarm"
    assert point["calibrated_on"] == "references, each scored against the others"
    assert "6 normal images cannot set a threshold for 5% false alarms" in point["warning"]
    assert tiny_detector.has_thresholds("references") and not tiny_detector.has_thresholds("head")
    tiny_detector.calibrate(normals, mode="references", percentile=80)  # holds for these references: kept
    kept = config.image_threshold
    tiny_detector.set_references(normals, calibrate=True)
    assert config.image_threshold == kept and config.score_stats["percentile"] == 80
    tiny_detector.set_references(normals[:4], calibrate=True)  # other references: they set their own
    assert config.score_stats["n_normal"] == 4 and tiny_detector.has_thresholds("references")

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, n in enumerate(normals):
        Image.fromarray(n).save(refs / f"n{i}.png")
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    base = ["predict", str(tmp_path / "x.png"), "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
            "--references", str(refs)]
    rows = {}
    for name, extra in {"self": [], "hand": ["--threshold", "0.5"], "head": ["--mode", "head"]}.items():
        capsys.readouterr()
        assert main(base + extra + ["--out", str(tmp_path / f"{name}.jsonl")]) == 0
        rows[name] = json.loads((tmp_path / f"{name}.jsonl").read_text())
        rows[name]["err"] = capsys.readouterr().err
    assert rows["self"]["mode"] == "references" and isinstance(rows["self"]["label"], bool)
    assert rows["self"]["threshold"] == pytest.approx(want, abs=1e-5)
    assert "calibrated on 6 references, each scored against the others" in rows["self"]["err"]
    assert "; next: more good parts make the threshold surer" in rows["self"]["err"]
    assert rows["hand"]["operating_point"] == "threshold set by hand" and "calibrated on" not in rows["hand"]["err"]
    assert rows["head"]["mode"] == "head" and rows["head"]["label"] is None
    assert "calibrated on" not in rows["head"]["err"] and "no threshold, so no decisions" in rows["head"]["err"]


def test_one_reference_sets_no_threshold_of_its_own(tiny_detector, caplog):
    """Against itself (outside each patch's neighbourhood) a single reference is no new part: measured from 0% to
    98% false alarms (docs/modes.md), so it sets no threshold, says why, and leaves the model's alone."""
    import logging

    from visualad.predictor import ONE_REFERENCE

    tiny_detector.to("cpu", "fp32")
    rng = np.random.default_rng(7)
    normals = [rng.integers(60, 200, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    config = tiny_detector.config
    config.image_threshold = config.pixel_threshold = config.score_stats = None
    with caplog.at_level(logging.WARNING, logger="visualad.predictor"):
        tiny_detector.set_references(normals[:1], calibrate=True)
    assert [r.getMessage() for r in caplog.records if r.name == "visualad.predictor"] == [ONE_REFERENCE]
    assert config.image_threshold is None and not tiny_detector.has_thresholds("references")
    res = tiny_detector.predict(normals[2], mode="references")
    assert res.mode == "references" and res.pred_label is None and res.anomaly_map.shape == (56, 56)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visualad.predictor"):
        tiny_detector.set_references(normals[:2], calibrate=True)  # two: each meets a real other part
    assert not [r for r in caplog.records if r.name == "visualad.predictor"]
    assert tiny_detector.has_thresholds("references")
    assert config.score_stats["n_normal"] == 2


def test_a_copy_of_a_reference_is_left_out(tiny_detector, caplog):
    """A copy would be its twin's nearest neighbour at distance 0 when the references score each other; two copies
    of one image are one reference (and set no threshold)."""
    import logging

    from visualad.predictor import ONE_REFERENCE

    rng = np.random.default_rng(8)
    a, b = (rng.integers(60, 200, (56, 56, 3), dtype=np.uint8) for _ in range(2))
    with caplog.at_level(logging.WARNING):
        tiny_detector.set_references([a, b, a.copy()])
    assert tiny_detector.references.shots == 2
    assert any("is a copy of an earlier one" in r.getMessage() and "#2" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny_detector.set_references([a, a], calibrate=True)
    assert tiny_detector.references.shots == 1 and ONE_REFERENCE in [r.getMessage() for r in caplog.records]


def test_each_mode_names_the_next_step():
    from visualad.modes.base import NO_THRESHOLD
    from visualad.modes.batch import BatchMode
    from visualad.modes.head import HeadMode
    from visualad.modes.references import ReferencesMode
    from visualad.operating import normals_needed

    assert [normals_needed(r) for r in (0.2, 0.1, 0.05, 0.01)] == [4, 9, 19, 99]
    refs = ReferencesMode(bank=None)
    assert refs.next_step(False, None) == NO_THRESHOLD
    assert "(19 or more set one for 5% false alarms, 99 for 1%)" in refs.next_step(True, 5)
    assert "--mode batch" in refs.next_step(True, 120) and "--mode batch" in refs.next_step(True, None)
    assert BatchMode().next_step(True, 50).startswith("new parts one at a time")
    assert BatchMode().next_step(False, None).startswith(NO_THRESHOLD + "; ")
    assert "--references DIR" in HeadMode().next_step(True, 50) and "--mode batch" in HeadMode().next_step(False, None)
