"""Data-parallel finetune under torchrun with 2 CPU processes (gloo): the same head as one process with the
same global batch and seed, one writer, and a killed run that resumes."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_TIMM
from safetensors.torch import load_file
from test_train import _make_mvtec

from visualad import AnomalyDetector

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args, nproc=2, script=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_port()}"] + ([script] if script else ["-m", "visualad"]) + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def setup(tmp_path):
    aux = _make_mvtec(tmp_path / "aux", n_good=3, n_bad=3)
    base = AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                         sca_dropout=0.0, saf_dropout=0.0, **TINY_TIMM)  # dropout off
    return aux, base.save_pretrained(tmp_path / "base")


def _args(aux, model, out, epochs=2, extra=()):
    return ["finetune", str(aux), "--model", str(model), "--out", str(out), "--device", "cpu", "--epochs",
            str(epochs), "--batch-size", "4", "--seed", "7", "--synthesize", "never", "-q", *extra]


def _same_heads(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(x) == set(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_two_processes_train_the_head_of_one(setup, tmp_path):
    aux, model = setup
    single = subprocess.run([sys.executable, "-m", "visualad", *_args(aux, model, tmp_path / "single")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _torchrun(_args(aux, model, tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert _same_heads(tmp_path / "single", tmp_path / "ddp") < 1e-4
    assert _same_heads(model, tmp_path / "single") > 1e-3  # training moved the head: the equality means something
    one = json.loads((tmp_path / "single" / "training_report.json").read_text())
    two = json.loads((tmp_path / "ddp" / "training_report.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["steps"] == one["steps"]
    assert abs(two["final_loss"] - one["final_loss"]) < 1e-4
    assert ddp.stdout.count("model written to") == 1  # rank 0 speaks and writes
    outputs = sorted(p.name for p in tmp_path.iterdir())
    assert outputs == ["aux", "base", "ddp", "single"]
    assert not (tmp_path / "ddp" / "checkpoint").exists()


def test_a_killed_ddp_run_resumes_to_the_same_head(setup, tmp_path):
    aux, model = setup
    single = subprocess.run([sys.executable, "-m", "visualad", *_args(aux, model, tmp_path / "single", epochs=3)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    killer = tmp_path / "killed_after_epoch_1.py"
    killer.write_text(textwrap.dedent("""
        import os, signal, sys
        import visualad.train.loop as loop
        real = loop.save_checkpoint
        def save(directory, model, optimizer, scheduler, state):
            path = real(directory, model, optimizer, scheduler, state)
            if state["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # rank 0, right after its first checkpoint
            return path
        loop.save_checkpoint = save
        from visualad.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "ddp"
    killed = _torchrun(_args(aux, model, out, epochs=3), script=str(killer))
    assert killed.returncode != 0 and (out / "checkpoint").is_dir() and not (out / "model.safetensors").exists()
    resumed = _torchrun(_args(aux, model, out, epochs=3, extra=("--resume",)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_heads(tmp_path / "single", out) < 1e-4
    assert json.loads((out / "training_report.json").read_text())["resumed_from_epoch"] == 1
