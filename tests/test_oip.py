"""The Open Inference Protocol as Triton's own client speaks it (tritonclient[http], a dev dependency), against
the real server on 127.0.0.1: health, server and model metadata, model ready (plain and versioned), infer in
JSON and with the binary tensor data extension, outputs that follow their datatypes, limits, errors; and the
docs' client example, run as written."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TIMM
from PIL import Image
from serving import running

from visualad import AnomalyDetector
from visualad.serve.app import create_app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serve.md"
TOL = 1e-5


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def det():
    return AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                         **TINY_TIMM)


def _client(url: str):
    import tritonclient.http as httpclient  # the dev extra installs it: missing, this fails, never skips

    return httpclient, httpclient.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=60.0)


def _want(det, blobs, mode):
    return [r.pred_score for r in det.predict([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs],
                                              mode=mode)]


def test_triton_client_health_metadata_and_infer_in_json_and_binary(det):
    blobs = [_png(i) for i in range(4)]
    want = _want(det, blobs, "batch")
    with running(create_app(det, model_name="tiny")) as url:
        http, client = _client(url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
        assert not client.is_model_ready("other") and not client.is_model_ready("tiny", "7")
        server = client.get_server_metadata()
        assert server["name"] == "visualad" and "binary_tensor_data" in server["extensions"]
        meta = client.get_model_metadata("tiny", "1")
        assert meta["versions"] == ["1"] and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

        # JSON: base64 strings in data, JSON outputs
        image = http.InferInput("image", [4], "BYTES")
        image.set_data_from_numpy(np.array([base64.b64encode(b) for b in blobs], dtype=np.object_), binary_data=False)
        result = client.infer("tiny", [image], outputs=[http.InferRequestedOutput("score", binary_data=False)],
                              parameters={"mode": "batch"})
        np.testing.assert_allclose(result.as_numpy("score"), want, atol=TOL)
        response = result.get_response()
        assert response["parameters"] == {"mode": "batch", "calibrated": False}
        assert [o["name"] for o in response["outputs"]] == ["score"]  # no label: no threshold, no null in a BOOL

        # binary: raw image bytes in, every output binary out (the client's default), versioned route
        image = http.InferInput("image", [4], "BYTES")
        image.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
        result = client.infer("tiny", [image], model_version="1", parameters={"mode": "batch", "overlay": "png"})
        np.testing.assert_allclose(result.as_numpy("score"), want, atol=TOL)
        assert result.as_numpy("score").dtype == np.float32 and result.as_numpy("label") is None
        pictures = result.as_numpy("overlay")
        assert len(pictures) == 4 and Image.open(io.BytesIO(pictures[0])).size[0] == 50


def test_a_calibrated_model_answers_a_bool_label_tensor(det):
    det.calibrate([np.asarray(Image.open(io.BytesIO(_png(10 + i))).convert("RGB")) for i in range(6)], mode="head")
    blobs = [_png(i) for i in range(3)]
    labels = [r.pred_label for r in det.predict([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs],
                                                 mode="head")]
    with running(create_app(det, model_name="tiny")) as url:
        http, client = _client(url)
        image = http.InferInput("image", [3], "BYTES")
        image.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        result = client.infer("tiny", [image], parameters={"mode": "head"})
        assert result.as_numpy("label").dtype == np.bool_ and result.as_numpy("label").tolist() == labels
        assert result.get_response()["parameters"]["calibrated"] is True


def test_errors_and_limits_in_the_protocols_form(det):
    from tritonclient.utils import InferenceServerException

    with running(create_app(det, model_name="tiny", max_images=3, max_upload_mb=0.5)) as url:
        http, client = _client(url)
        image = http.InferInput("image", [4], "BYTES")
        image.set_data_from_numpy(np.array([_png(i) for i in range(4)], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="over the limit of 3"):
            client.infer("tiny", [image])
        big = http.InferInput("image", [1], "BYTES")
        big.set_data_from_numpy(np.array([b"\0" * (600 * 1024)], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="over the limit"):
            client.infer("tiny", [big])
        wrong = http.InferInput("image", [1], "FP32")
        wrong.set_data_from_numpy(np.zeros(1, np.float32))
        with pytest.raises(InferenceServerException, match="BYTES"):
            client.infer("tiny", [wrong])
        with pytest.raises(InferenceServerException, match="no model 'other'"):
            client.get_model_metadata("other")
        import urllib.request
        import json

        req = urllib.request.Request(url + "/v2/nothing-here")
        try:
            urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404 and "error" in json.loads(exc.read())


def test_the_docs_client_example_runs_as_written(det, tmp_path):
    text = DOCS.read_text()
    code = re.search(r"<!-- triton-example -->\n```python\n(.*?)```", text, re.S).group(1)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"part{i + 1}.png")
        paths[-1].write_bytes(_png(i))
    with running(create_app(det)) as url:
        code = code.replace("127.0.0.1:8000", url.removeprefix("http://"))
        code = code.replace('"part1.png", "part2.png"', ", ".join(repr(str(p)) for p in paths))
        scope: dict = {}
        exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 - our own docs' example
    np.testing.assert_allclose(scope["scores"], _want(det, [p.read_bytes() for p in paths], "head"), atol=TOL)
