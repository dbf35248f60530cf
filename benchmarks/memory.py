"""Peak memory of ``visualad predict`` against the number of inputs: it must not grow with the folder.

    python benchmarks/memory.py [--side 6000] [--counts 4 16] [--batch-size 8]

Writes N JPEG images of side x side pixels (smooth random colour fields) to a temporary folder, runs
``visualad predict DIR --mode head`` in a fresh process per N, and prints each run's peak RSS and the ratio
to the smallest N (measured in the same run). The bounded read-ahead keeps at most two batches in flight and
drops each input's full-size pixels once resized; without --overlays the CLI makes no full-size map (the rows
carry the score and the input's size), so the ratio should stay near 1. What remains is the transient of a
decode (two worker threads, each ~250 MB for a 36 MP JPEG) overlapping a forward: it does not grow with N.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHILD = ("import resource, sys; from visualad.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def make_images(folder: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (side // 100, side // 100, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BILINEAR).save(folder / f"img_{i:04d}.jpg", quality=90)


def peak_kb(folder: Path, batch_size: int) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, "predict", str(folder), "--mode", "head", "--device", "cpu",
                           "--out", str(folder.parent / f"{folder.name}.jsonl"), "--batch-size", str(batch_size),
                           "-q"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return int(proc.stdout.split("PEAK_KB")[-1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6000)
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {}
        for n in args.counts:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            make_images(folder, n, args.side)
            peaks[n] = peak_kb(folder, args.batch_size)
            print(f"{n:5d} images of {args.side}x{args.side}: peak RSS {peaks[n] / 1024:.0f} MiB", flush=True)
        base = peaks[min(peaks)]
        for n, kb in peaks.items():
            print(f"ratio N={n} / N={min(peaks)}: {kb / base:.3f}")


if __name__ == "__main__":
    main()
