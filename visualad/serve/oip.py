"""The Open Inference Protocol v2 (KServe, Triton) on the wire: infer requests in JSON or with the binary
tensor data extension, and responses in the encodings the client asks for. No web framework here: the
routes (:mod:`visualad.serve.app`) hand bytes in and take bytes out.

Inputs: one ``BYTES`` tensor of encoded images (PNG, JPEG, ...): base64 strings in JSON ``data``, or, with the
binary extension (``Inference-Header-Content-Length``, ``parameters.binary_data_size``), each element as a
4-byte little-endian length and the raw bytes. Outputs: ``score`` (FP32), ``label`` (BOOL, only when the
model is calibrated for the mode that ran; the response's ``parameters.calibrated`` says which) and, when
``parameters.overlay`` is ``"png"``, ``overlay`` (BYTES, PNG pictures). Binary outputs when asked for
(``parameters.binary_data_output`` on the request, or ``parameters.binary_data`` on a requested output).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import RequestError

HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = {"score": "FP32", "label": "BOOL", "overlay": "BYTES"}


@dataclass
class InferRequest:
    images: List[bytes]
    parameters: Dict[str, Any] = field(default_factory=dict)
    id: Optional[str] = None
    outputs: Optional[List[str]] = None  # asked for by name; None: all
    binary: Dict[str, bool] = field(default_factory=dict)  # per output: raw bytes in the response


def _bytes_elements(raw: bytes, count: int) -> List[bytes]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise RequestError(400, "BYTES binary data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise RequestError(400, "BYTES binary data ends inside an element")
        out.append(raw[at:at + n])
        at += n
    if len(out) != count:
        raise RequestError(400, f"the input's shape says {count} images, its binary data holds {len(out)}")
    return out


def parse_infer(body: bytes, header_length: Optional[str], max_images: int) -> InferRequest:
    """An infer request body (JSON, or a JSON header then binary tensor data) -> its images and settings."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a length within "
                                     "the body")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep, a number too long
        raise RequestError(400, f"the request is not JSON that can be read ({str(exc)[:200]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list) or len(payload["inputs"]) != 1:
        raise RequestError(400, "expected {'inputs': [one BYTES tensor of encoded images]}")
    inp = payload["inputs"][0]
    params = {} if payload.get("parameters") is None else payload["parameters"]
    if not isinstance(inp, dict) or not isinstance(params, dict):
        raise RequestError(400, "inputs[0] and parameters must be objects")
    in_params = {} if inp.get("parameters") is None else inp["parameters"]
    if not isinstance(in_params, dict):
        raise RequestError(400, "inputs[0].parameters must be an object")
    if inp.get("datatype") != "BYTES":
        raise RequestError(400, f"inputs[0].datatype must be BYTES (encoded images), got {inp.get('datatype')!r}")
    shape = inp.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestError(400, f"inputs[0].shape must be [n] or [n, 1] image counts, got {shape!r}")
    count = math.prod(shape)
    if count < 1:
        raise RequestError(400, "no images in the request")
    if count > max_images:
        raise RequestError(413, f"{count} images in one request is over the limit of {max_images} (--max-images)")
    size = in_params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size != len(binary):
            raise RequestError(400, f"binary_data_size {size!r} does not match the {len(binary)} bytes sent")
        images = _bytes_elements(binary, count)
    else:
        data = inp.get("data")
        if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
            raise RequestError(400, f"inputs[0].data must hold {count} base64 strings (the shape's count)")
        try:
            images = [base64.b64decode(d, validate=True) for d in data]
        except (binascii.Error, ValueError):
            raise RequestError(400, "inputs[0].data holds a string that is not base64") from None
    wanted = payload.get("outputs")
    names: Optional[List[str]] = None
    binary_out = {name: bool(params.get("binary_data_output", False)) for name in OUTPUTS}
    if wanted is not None:
        if not isinstance(wanted, list) or not all(
                isinstance(o, dict) and o.get("name") in OUTPUTS and isinstance(o.get("parameters") or {}, dict)
                for o in wanted):
            raise RequestError(400, f"outputs must be objects naming some of {sorted(OUTPUTS)}")
        names = [o["name"] for o in wanted]
        for o in wanted:
            binary_out[o["name"]] = bool((o.get("parameters") or {}).get("binary_data", binary_out[o["name"]]))
    rid = payload.get("id")
    return InferRequest(images, params, None if rid is None else str(rid), names, binary_out)


def _serialize(datatype: str, values: Sequence[Any]) -> bytes:
    if datatype == "FP32":
        return np.asarray(values, dtype="<f4").tobytes()
    if datatype == "BOOL":
        return np.asarray(values, dtype=np.bool_).tobytes()
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def encode_response(req: InferRequest, model_name: str, outputs: Dict[str, Sequence[Any]],
                    parameters: Dict[str, Any]) -> Tuple[bytes, Dict[str, str]]:
    """The response body and its headers: JSON, or a JSON header then the binary outputs."""
    tensors, blobs = [], []
    for name, values in outputs.items():
        if req.outputs is not None and name not in req.outputs:
            continue
        dtype = OUTPUTS[name]
        tensor: Dict[str, Any] = {"name": name, "datatype": dtype, "shape": [len(values)]}
        if req.binary.get(name):
            raw = _serialize(dtype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = ([base64.b64encode(v).decode() for v in values] if dtype == "BYTES"
                              else [float(v) if dtype == "FP32" else bool(v) for v in values])
        tensors.append(tensor)
    head = json.dumps({"model_name": model_name, "model_version": "1", "id": req.id, "parameters": parameters,
                       "outputs": tensors}).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(head))}
