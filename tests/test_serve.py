"""The HTTP service over real HTTP on 127.0.0.1: the same scores as predict, the v2 protocol, 401, 413 and
broken images, concurrent clients sharing forwards, batch mode confined to one request, references and
calibration, and the inspection page in a real headless Chromium."""
from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import headless_browser, post_files, request, running

from visualad import AnomalyDetector
from visualad.serve.app import create_app

TOL = 1e-5


def _png(seed, size=(40, 50)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def det():
    from conftest import TINY_TIMM

    return AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                         **TINY_TIMM)


def _expected(det, blobs, mode="head"):
    return det.predict([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs], mode=mode)


def test_predict_and_v2_infer_give_the_scores_of_predict(det):
    blobs = [_png(i) for i in range(3)]
    want = _expected(det, blobs)
    with running(create_app(det, model_name="tiny")) as url:
        assert request(url + "/v2/health/live") == (200, {"live": True})
        assert request(url + "/v2/health/ready")[0] == 200
        assert request(url + "/v2/models") == (200, {"models": ["tiny"]})
        code, meta = request(url + "/v2/models/tiny")
        assert code == 200 and meta["image_size"] == 56 and meta["head_trained"] is False
        code, body = post_files(url + "/predict?mode=head", [(f"p{i}.png", b) for i, b in enumerate(blobs)])
        assert code == 200
        rows = body["results"]
        assert [r["path"] for r in rows] == ["p0.png", "p1.png", "p2.png"]
        for r, w in zip(rows, want):
            assert abs(r["score"] - w.pred_score) < TOL and r["mode"] == "head"
            assert (r["height"], r["width"]) == (40, 50) and r["regions"] == [] and r["error"] is None
        payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                               "data": [base64.b64encode(b).decode() for b in blobs]}], "parameters": {"mode": "head"}}
        import json

        code, out = request(url + "/v2/models/tiny/infer", json.dumps(payload).encode(),
                            {"Content-Type": "application/json"}, "POST")
        assert code == 200 and out["outputs"][0]["name"] == "score"
        assert np.allclose(out["outputs"][0]["data"], [w.pred_score for w in want], atol=TOL)
        assert request(url + "/v2/models/other")[0] == 404
        code, body = post_files(url + "/predict?mode=head&overlay=png", [("p0.png", blobs[0])])
        pic = Image.open(io.BytesIO(base64.b64decode(body["results"][0]["overlay_png"])))
        assert pic.size[0] == 50 and pic.size[1] > 40


def test_token_upload_limit_and_broken_images(det):
    with running(create_app(det, token="s3cret", max_upload_mb=0.05)) as url:
        assert post_files(url + "/predict", [("a.png", _png(0))])[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert post_files(url + "/predict", [("a.png", _png(0))], {"Authorization": "Bearer wrong"})[0] == 401
        assert request(url + "/v2/health/ready")[0] == 200  # health needs no token
        big = _png(1, size=(200, 200))  # ~120 KB of noise, over 0.05 MB
        code, body = post_files(url + "/predict", [("big.png", big)], auth)
        assert code == 413 and "limit" in body["error"]
        code, body = post_files(url + "/predict", [("broken.png", b"\x89PNG\r\n\x1a\n not really")], auth)
        assert code == 422 and "broken.png" in body["error"]
        truncated = _png(2)[:200]
        code, body = post_files(url + "/predict", [("cut.png", truncated)], auth)
        assert code == 422 and "cut.png" in body["error"]
        code, body = post_files(url + "/predict?mode=head", [("ok.png", _png(3))], auth)
        assert code == 200 and body["results"][0]["error"] is None  # still healthy


def test_concurrent_clients_share_forwards_and_batch_mode_stays_in_one_request(det):
    app = create_app(det, max_batch_size=8, max_latency_ms=50)
    blobs = [_png(10 + i) for i in range(8)]
    want = _expected(det, blobs)
    sets = [[_png(100 + 10 * k + i) for i in range(5)] for k in range(2)]
    want_sets = [_expected(det, s, mode="batch") for s in sets]
    got, got_sets, errors = {}, {}, []

    def client(i):
        try:
            code, body = post_files(url + "/predict?mode=head", [(f"c{i}.png", blobs[i])])
            got[i] = body["results"][0]["score"]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def batch_client(k):
        code, body = post_files(url + "/predict?mode=batch", [(f"s{k}_{i}.png", b) for i, b in enumerate(sets[k])])
        got_sets[k] = [r["score"] for r in body["results"]]

    with running(app) as url:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        threads += [threading.Thread(target=batch_client, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors and len(got) == 8
    for i, w in enumerate(want):
        assert abs(got[i] - w.pred_score) < TOL
    assert app.state.batcher.batches < 8 + 2  # some head requests shared a forward
    for k in range(2):  # each set scored against itself only: equal to predict on that set alone
        assert np.allclose(got_sets[k], [w.pred_score for w in want_sets[k]], atol=TOL)


def test_references_and_calibration_from_normal_images(det):
    normals = [_png(200 + i) for i in range(5)]
    with running(create_app(det)) as url:
        parts = [(f"n{i}.png", b) for i, b in enumerate(normals)]
        code, body = post_files(url + "/references?calibrate=false", parts)
        assert code == 200 and body == {"references": 5}  # no threshold asked for, none held
        assert post_files(url + "/predict", [("x.png", _png(300))])[1]["results"][0]["label"] is None
        code, body = post_files(url + "/references", parts)  # as `visualad predict --references`: they set one
        assert code == 200 and body["references"] == 5 and body["image_threshold"] is not None
        assert "calibrated on 5 references, each scored against the others" in body["operating_point"]
        assert "only 5 normal images" in body["warning"] and "these images are the references" in body["warning"]
        self_set = body["image_threshold"]
        row = post_files(url + "/predict", [("x.png", _png(300))])[1]["results"][0]
        assert row["mode"] == "references" and row["threshold"] == self_set and isinstance(row["label"], bool)
        code, body = post_files(url + "/calibrate?mode=references", [("n0.png", normals[0])])
        assert code == 400 and "at least 5 normal images, got 1" in body["error"]  # one score is no threshold
        code, body = post_files(url + "/calibrate?mode=references", [(f"n{i}.png", b) for i, b in enumerate(normals)])
        assert code == 200 and body["mode"] == "references" and body["image_threshold"] is not None
        assert "only 5 normal images" in body["warning"] and "these images are the references" in body["warning"]
        # the 99.5th percentile of 5 scores lies between the two highest: at most 2 of 6 normal parts
        assert "calibrated on 5 references, each scored against the others (false alarms expected at most 33%" \
            in body["operating_point"]
        calibrated = body["image_threshold"]
        assert calibrated != self_set  # the 99.5th percentile, not the self-set 5% false alarms
        code, body = post_files(url + "/predict", [("x.png", _png(300))])
        row = body["results"][0]
        assert row["mode"] == "references" and isinstance(row["label"], bool) and row["threshold"] == calibrated
        code, body = post_files(url + "/references", parts)  # the same references: the thresholds they hold stay
        assert code == 200 and body["image_threshold"] == calibrated
        code, body = post_files(url + "/references", parts[:1])  # one reference sets no threshold of its own
        assert code == 200 and body["references"] == 1 and "image_threshold" not in body
        assert body["warning"].startswith("one reference cannot set its own threshold")


def test_the_page_in_a_headless_browser(det, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img = tmp_path / "part.png"
    img.write_bytes(_png(7, size=(60, 80)))
    img2 = tmp_path / "second.png"
    img2.write_bytes(_png(8, size=(60, 80)))
    want = _expected(det, [img.read_bytes()])[0].pred_score
    with running(create_app(det, model_name="tiny")) as url, headless_browser() as browser:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: "tiny:" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "mode").send_keys("head")
        browser.find_element(By.ID, "files").send_keys(str(img))
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .score"))
        shown = float(browser.find_element(By.CSS_SELECTOR, "#results .score").text)
        assert abs(shown - want) < 1e-3  # the page shows 4 decimals
        assert "part.png" in browser.find_element(By.ID, "results").text
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert Path(tmp_path / "page.png").stat().st_size > 1000
        browser.find_element(By.ID, "as-references").click()  # the image shown becomes the reference ...
        WebDriverWait(browser, 60).until(lambda b: "reference set" in b.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").text == "1 reference set"  # ... and, alone, sets no threshold
        assert browser.find_element(By.ID, "warning").text.startswith("one reference cannot set its own threshold")
        assert not det.has_thresholds("references")
        browser.find_element(By.ID, "files").send_keys(str(img2))  # the input keeps part.png: both are shown
        WebDriverWait(browser, 60).until(lambda b: "second.png" in b.find_element(By.ID, "results").text
                                         and "part.png" in b.find_element(By.ID, "results").text)
        browser.find_element(By.ID, "as-references").click()  # two: each meets a real other part
        WebDriverWait(browser, 60).until(lambda b: "2 references set" in b.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").text.startswith("2 references set; threshold from them: ")
        assert "these images are the references" in browser.find_element(By.ID, "warning").text
        assert det.has_thresholds("references")


def test_visualad_serve_answers_then_exits_0_on_sigterm(det, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    model = det.save_pretrained(tmp_path / "m")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a lone request waits up to 3 s for others to share its forward: it is in flight when SIGTERM comes
    proc = subprocess.Popen([sys.executable, "-m", "visualad", "serve", "--model", str(model), "--device", "cpu",
                             "--port", str(port), "--max-batch-size", "64", "--max-latency-ms", "3000", "-q"],
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(url + "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
            time.sleep(0.2)
        answers = []
        client = threading.Thread(target=lambda: answers.append(
            post_files(url + "/predict?mode=head", [("a.png", _png(1))])))
        client.start()
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        client.join(timeout=60)
        rc = proc.wait(timeout=30)
        err = proc.stderr.read()
        assert answers and answers[0][0] == 200 and answers[0][1]["results"][0]["error"] is None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0 and "Traceback" not in err


def test_the_page_says_what_the_threshold_and_each_slider_position_mean(det, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import visualad

    calibrated = visualad.AnomalyDetector(det.model, device="cpu", dtype="fp32")
    normals = [np.asarray(Image.open(io.BytesIO(_png(400 + i)))) for i in range(9)]
    got = calibrated.calibrate(normals, mode="head", false_alarm_rate=0.2)
    scores = got["normal_scores"]
    with running(create_app(calibrated, model_name="tiny")) as url, headless_browser() as browser:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: "tiny:" in b.find_element(By.ID, "model").text)
        point = browser.find_element(By.ID, "operating-point").text
        assert point == "operating point: " + got["operating_point"]["description"]
        # the calibrated threshold is the 8th of 9 scores: 2 of 10 at or above it
        shown = browser.find_element(By.ID, "threshold-value").text
        assert "flags about 20% of normal parts, from 9 calibration normals" in shown, shown
        browser.execute_script("setThreshold(arguments[0])", scores[-1] + 1.0)  # above every normal
        shown = browser.find_element(By.ID, "threshold-value").text
        assert "flags about 10% of normal parts" in shown, shown


@pytest.mark.parametrize("limits", [dict(max_upload_mb=float("nan")), dict(max_upload_mb=-1.0),
                                    dict(max_decode_mp=float("inf")), dict(max_decode_mp=0.0),
                                    dict(max_latency_ms=float("nan")), dict(max_images=0)])
def test_limits_that_bound_nothing_are_refused(det, limits):
    from visualad.errors import ConfigError

    with pytest.raises(ConfigError):  # a NaN limit compares false: no bound at all
        create_app(det, **limits)
