"""The service under hostile input, against the real server on 127.0.0.1 (every loop bounded): cross-site
posts, rebound host names, bodies that stream past the limit, too many images, decompression bombs, malformed
requests (4xx with a reason, never 500), and the page: user text as text, a CSP, usable with a token."""
from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import threading
import time
import zlib
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from serving import headless_browser, multipart, post_files, request, running

from visualad import AnomalyDetector
from visualad.serve.app import create_app
from visualad.serve.errors import RequestError
from visualad.serve.limits import PixelBudget

INFER = "/v2/models/visualad/infer"


def _tiny():
    from conftest import TINY_TIMM

    return AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                         **TINY_TIMM)


@pytest.fixture(scope="module")
def det():
    return _tiny()


def _png(seed, size=(40, 50)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _claimed_png(width, height):
    """A valid PNG header that claims ``width`` x ``height`` pixels, in a few hundred bytes (a decompression bomb's
    header; its pixels never need to exist for the size check)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _raw(url, method, path, body=b"", headers=None):
    """One request over http.client (so that Host, Origin and the framing are ours); (status, JSON or None,
    headers)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        data = res.read()
        try:
            return res.status, json.loads(data), dict(res.getheaders())
        except ValueError:
            return res.status, None, dict(res.getheaders())
    finally:
        conn.close()


def _infer_body(images, **extra):
    payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                           "data": [base64.b64encode(b).decode() for b in images]}], **extra}
    return json.dumps(payload).encode()


def test_cross_site_posts_cannot_change_the_model(det):
    normals = [("n.png", _png(1))]
    body, h = multipart(normals)
    with running(create_app(det)) as url:
        own = url  # http://127.0.0.1:PORT
        for header in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page.html"},
                       {"Origin": "null"}, {"Origin": own.replace("127.0.0.1", "127.0.0.2")}):
            for path in ("/references", "/calibrate", "/predict", INFER):
                code, out, _ = _raw(url, "POST", path, body, {**h, **header})
                assert code == 403 and "another origin" in out["error"], (path, header, code)
        assert request(url + "/v2/models/visualad")[1]["references"] == 0  # nothing changed
        code, out, _ = _raw(url, "POST", "/references", body, {**h, "Origin": own})  # the page itself
        assert code == 200 and out["references"] == 1
        assert post_files(url + "/references", normals)[0] == 200  # a client that is no browser: no Origin
    with running(create_app(det, token="t0k")) as url:  # with the token, the origin does not matter
        code, _, _ = _raw(url, "POST", "/references", body, {**h, "Origin": "http://evil.example",
                                                              "Authorization": "Bearer t0k"})
        assert code == 200


def test_only_this_servers_host_names_are_answered(det):
    with running(create_app(det, allowed_hosts=["proxy.internal"])) as url:
        port = urlsplit(url).port
        for host in ("evil.example", f"evil.example:{port}", f"evil.example:80@127.0.0.1:{port}", "", "a b"):
            code, out, _ = _raw(url, "GET", "/v2/models/visualad", headers={"Host": host})
            assert code == 400 and "not this server's name" in out["error"], host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "[::1]:8000", "10.1.2.3",
                     "proxy.internal", f"Proxy.Internal:{port}"):
            code, out, _ = _raw(url, "GET", "/v2/models/visualad", headers={"Host": host})
            assert code == 200 and out["name"] == "visualad", host


def _stream_past_the_limit(url, path, headers, start=b"", total=200 * 2**20, chunk=2**20):
    """Send a chunked body of ``total`` bytes (``start``, then zeros); returns (status, JSON, bytes sent before the
    server answered and closed)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    sent = 0

    def body():
        nonlocal sent
        block = b"\0" * chunk
        yield start
        while sent < total:
            sent += chunk
            yield block

    try:
        try:
            conn.request("POST", path, body=body(), headers=headers, encode_chunked=True)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        res = conn.getresponse()
        return res.status, json.loads(res.read()), sent
    finally:
        conn.close()


PART = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'


@pytest.mark.parametrize("path,ctype,start", [("/predict", "multipart/form-data; boundary=xyz", PART),
                                              ("/references", "multipart/form-data; boundary=xyz", PART),
                                              (INFER, "application/json", b'{"inputs": [{"data": ["')])
def test_limits_hold_while_a_chunked_body_streams(det, path, ctype, start):
    with running(create_app(det, max_upload_mb=1)) as url:
        code, out, sent = _stream_past_the_limit(url, path, {"Content-Type": ctype}, start)
        assert code == 413 and "limit" in out["error"], out
        assert sent < 64 * 2**20, f"the server read {sent} bytes of a 200 MiB body before refusing it"


def test_images_per_request_are_capped_on_every_route(det):
    images = [(f"{i}.png", _png(i, size=(8, 8))) for i in range(5)]
    with running(create_app(det, max_images=4)) as url:
        for path in ("/predict", "/references", "/calibrate"):
            code, out = post_files(url + path, images)
            assert code == 413 and "limit" in out["error"] and "4" in out["error"], path
        code, out = request(url + INFER, _infer_body([b for _, b in images]), {"Content-Type": "application/json"},
                            "POST")
        assert code == 413 and "limit of 4" in out["error"]


def test_decompression_bombs_are_refused_by_their_header(det):
    with running(create_app(det, max_decode_mp=64)) as url:
        code, out = post_files(url + "/predict", [("bomb.png", _claimed_png(10000, 10000))])
        assert code == 413 and "100,000,000 pixels" in out["error"] and "--max-decode-mp" in out["error"]
        # past Pillow's own bomb limit too: the pixel-limit message, not "not an image"
        code, out = post_files(url + "/predict", [("huge.png", _claimed_png(20000, 20000))])
        assert code == 413 and "huge.png" in out["error"] and "400,000,000 pixels" in out["error"], out
        code, out = request(url + INFER, _infer_body([_claimed_png(10000, 10000)]),
                            {"Content-Type": "application/json"}, "POST")
        assert code == 413 and "pixels" in out["error"]
        # many small images that together pass the budget: refused as one request
        code, out = post_files(url + "/predict", [(f"{i}.png", _claimed_png(4000, 4000)) for i in range(5)])
        assert code == 413 and "80,000,000 pixels" in out["error"]
        assert post_files(url + "/predict?mode=head", [("ok.png", _png(3))])[0] == 200  # and it still serves


def test_the_pixel_budget_is_shared_by_requests_in_flight():
    budget = PixelBudget(100, wait_s=5.0)
    order, done = [], threading.Event()

    def second():
        with budget.hold(60):
            order.append(time.monotonic())
            done.wait(5)

    with budget.hold(70):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        assert not order and budget.used == 70  # waits: 70 + 60 > 100
        released = time.monotonic()
    deadline = time.monotonic() + 5
    while not order and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order and order[0] >= released and budget.used == 60
    done.set()
    t.join(timeout=5)
    assert budget.used == 0
    quick = PixelBudget(100, wait_s=0.2)
    with quick.hold(80), pytest.raises(RequestError) as busy:
        with quick.hold(30):
            pass
    assert busy.value.status == 503
    with pytest.raises(RequestError) as never:
        with quick.hold(101):
            pass
    assert never.value.status == 413


def _malformed_requests():
    json_h = {"Content-Type": "application/json"}
    ok = base64.b64encode(_png(5)).decode()
    one = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [ok]}
    cases = {
        "urlencoded body": ("/predict", b"file=abc", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        "no content type": ("/predict", b"abc", {}, 415),
        "file part without filename": ("/predict", b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'
                                       b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400),
        "multipart without boundary": ("/predict", b"abc", {"Content-Type": "multipart/form-data"}, 400),
        "data []": (INFER, {"inputs": [{**one, "data": []}]}, json_h, 400),
        "shape [0] data []": (INFER, {"inputs": [{**one, "shape": [0], "data": []}]}, json_h, 400),
        "parameters a string": (INFER, {"inputs": [one], "parameters": "x"}, json_h, 400),
        "parameters a list": (INFER, {"inputs": [one], "parameters": [1]}, json_h, 400),
        "input parameters a list": (INFER, {"inputs": [{**one, "parameters": [1]}]}, json_h, 400),
        "output parameters a string": (INFER, {"inputs": [one], "outputs": [{"name": "score", "parameters": "b"}]},
                                       json_h, 400),
        "datatype FP32": (INFER, {"inputs": [{**one, "datatype": "FP32"}]}, json_h, 400),
        "shape nested": (INFER, {"inputs": [{**one, "shape": [[1]]}]}, json_h, 400),
        "shape bool": (INFER, {"inputs": [{**one, "shape": [True]}]}, json_h, 400),
        "shape says two": (INFER, {"inputs": [{**one, "shape": [2]}]}, json_h, 400),
        "shape huge": (INFER, {"inputs": [{**one, "shape": [2**62, 2**62]}]}, json_h, 413),
        "data not base64": (INFER, {"inputs": [{**one, "data": ["%%%"]}]}, json_h, 400),
        "deep nesting": (INFER, b"[" * 100000 + b"]" * 100000, json_h, 400),
        "long number": (INFER, b'{"inputs": [' + b"9" * 10000 + b"]}", json_h, 400),
        "not utf-8": (INFER, b"\xff\xfe{}", json_h, 400),
        "binary size a bool": (INFER, {"inputs": [{**one, "parameters": {"binary_data_size": True}}]}, json_h, 400),
        "label of an uncalibrated model": (INFER, {"inputs": [one], "outputs": [{"name": "label"}]}, json_h, 400),
        "mode a number": (INFER, {"inputs": [one], "parameters": {"mode": 3}}, json_h, 400),
        "unknown mode": ("/predict?mode=nosuch", None, None, 400),
    }
    return cases


def test_malformed_requests_get_a_4xx_with_a_reason_never_500():
    cases = _malformed_requests()
    with running(create_app(_tiny())) as url:  # uncalibrated (references posted by other tests set thresholds)
        for name, (path, body, headers, want) in cases.items():
            if body is None:
                code, out = post_files(url + path, [("a.png", _png(6))])
            else:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                code, out, _ = _raw(url, "POST", path, data, headers)
            assert code == want and isinstance(out.get("error"), str) and out["error"], (name, code, out)


def test_every_answer_carries_the_security_headers(det):
    with running(create_app(det)) as url:
        for method, path in (("GET", "/"), ("GET", "/page.js"), ("GET", "/v2/models/visualad"), ("GET", "/nope"),
                             ("POST", "/predict")):
            _, _, headers = _raw(url, method, path)
            headers = {k.lower(): v for k, v in headers.items()}
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"


def test_the_page_shows_file_names_as_text_and_works_with_a_token(det, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = "<img src=x onerror=window.pwned=1>.png"
    img = tmp_path / name
    img.write_bytes(_png(7, size=(60, 80)))
    with running(create_app(det, model_name="tiny", token="s3cret")) as url:
        with headless_browser() as browser:
            browser.get(url + "/")  # the page itself needs no token...
            bar = browser.find_element(By.ID, "token-bar")
            WebDriverWait(browser, 30).until(lambda b: bar.is_displayed())  # ...it asks for one
            browser.find_element(By.ID, "token").send_keys("s3cret")
            bar.submit()
            WebDriverWait(browser, 30).until(lambda b: "tiny:" in b.find_element(By.ID, "model").text)
            browser.find_element(By.ID, "mode").send_keys("head")
            browser.find_element(By.ID, "files").send_keys(str(img))
            WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .score"))
            assert name in browser.find_element(By.ID, "results").text  # shown as text
            assert browser.execute_script("return window.pwned === undefined")  # never run
            assert len(browser.find_elements(By.CSS_SELECTOR, "#results img")) == 1  # the overlay, no other
            browser.refresh()  # the token is kept for the tab
            WebDriverWait(browser, 30).until(lambda b: "tiny:" in b.find_element(By.ID, "model").text)
