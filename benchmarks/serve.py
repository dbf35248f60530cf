"""The HTTP service under concurrent clients on 127.0.0.1: requests per second with dynamic batching against
batch size 1, p50 and p99 latency, peak memory, from one run.

    python benchmarks/serve.py [--clients 8] [--requests 12] [--latency-ms 10]

Each client posts ``--requests`` single-image requests (real example images, head mode, the offline default
model) one after another; all clients start together. Bounded: a fixed count, 60 s timeouts. Peak memory is
the process's (server and clients share it).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from serving import post_files, running  # noqa: E402

from visualad import AnomalyDetector  # noqa: E402
from visualad.serve.app import create_app  # noqa: E402


def load(url: str, blobs: List[bytes], clients: int, requests: int) -> Dict[str, float]:
    latencies: List[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            blob = blobs[(c + r) % len(blobs)]
            t = time.perf_counter()
            code, _ = post_files(url + "/predict?mode=head", [("img.png", blob)])
            if code != 200:
                raise SystemExit(f"HTTP {code}")
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"rps": len(lat) / wall, "p50": statistics.median(lat) * 1e3,
            "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--latency-ms", type=float, default=10.0)
    args = ap.parse_args()
    det = AnomalyDetector.from_pretrained(device="cpu")
    blobs = [p.read_bytes() for p in sorted((REPO / "examples" / "images").iterdir()) if p.suffix in (".png", ".jpg")]
    print(f"{args.clients} clients x {args.requests} requests of one image, head mode, default model "
          f"({det.config.image_size} px, {det.engine.dtype}), 127.0.0.1")
    rows = {}
    for label, size in (("batch size 1", 1), ("dynamic batching (up to 8)", 8)):
        app = create_app(det, max_batch_size=size, max_latency_ms=args.latency_ms)
        with running(app) as url:
            load(url, blobs, 2, 1)  # warm-up
            before = app.state.batcher.batches
            rows[label] = load(url, blobs, args.clients, args.requests)
            rows[label]["forwards"] = app.state.batcher.batches - before
    base = rows["batch size 1"]["rps"]
    for label, r in rows.items():
        print(f"  {label:<28} {r['rps']:6.2f} requests/s ({r['rps'] / base:.2f}x)  p50 {r['p50']:7.1f} ms  "
              f"p99 {r['p99']:7.1f} ms  forwards {int(r['forwards'])}")
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
