"""How long the command line makes a user wait where it should not: ``visualad info`` (against a bare Python
start and ``info --probe``, which imports torch, measured in the same run) and an idle ``visualad serve`` from
SIGTERM to exit (against the time it takes to come up).

    python benchmarks/cli_latency.py [--model DIR] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def timed(argv: list) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def serve_stop(model: list) -> tuple:
    """(seconds to come up, seconds from SIGTERM to exit) of an idle server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "visualad", "serve", *model, "--port", str(port), "-q"],
                            stderr=subprocess.DEVNULL)
    deadline = start + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the server did not come up") from None
            time.sleep(0.1)
    up = time.monotonic() - start
    time.sleep(1.0)
    stop = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    if proc.wait(timeout=60) != 0:
        raise RuntimeError("the server did not exit 0")
    return up, time.monotonic() - stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model for the server (default: the default model)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    py = [sys.executable, "-m", "visualad"]
    rows = {"python -c pass": [sys.executable, "-c", "pass"], "visualad info": py + ["info"],
            "visualad info --probe (imports torch)": py + ["info", "--probe"]}
    times = {name: statistics.median(timed(argv) for _ in range(args.runs)) for name, argv in rows.items()}
    base = times["python -c pass"]
    print(f"| command | median of {args.runs} | x python start |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} s | {t / base:.1f}x |")
    model = ["--model", args.model] if args.model else []
    runs = [serve_stop(model) for _ in range(args.runs)]
    up, stop = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"| idle visualad serve: start to ready | {up:.2f} s | |")
    print(f"| idle visualad serve: SIGTERM to exit | {stop:.2f} s | {stop / up:.2f}x of its start |")


if __name__ == "__main__":
    main()
