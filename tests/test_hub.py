"""The download layer against a fake Hub/CDN on 127.0.0.1 (tests/hubserver.py): no internet needed."""
from __future__ import annotations

import hashlib
import logging
import os
import time
import types
from pathlib import Path

import pytest

from hubserver import lfs_pointer, sha256_hex
from visualad.errors import OfflineError, WeightsError
from visualad.weights import hub as H

REPO = "visualad-test/tiny-model"
COMMIT = "8479132d641456345019aed1c8bb6b2d11941068"
OTHER_COMMIT = "0" * 40
WEIGHTS = bytes(range(256)) * 1024 + b"tail"  # 256 KiB + 4: more than one read chunk on the wire
CONFIG = b'{"backbone": "tiny", "image_size": 56}\n'
POINTER_SOURCE = b"the real checkpoint bytes" * 100
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VISUALAD_OFFLINE")


@pytest.fixture
def hub(fake_hub):
    """Fake Hub with one pinned repo (see the fake_hub fixture in conftest.py)."""
    fake_hub.add_repo(REPO, COMMIT, {
        "config.json": CONFIG,
        "model.safetensors": WEIGHTS,
        "README.md": b"# tiny\n",
        "weights/CLIP.pth": lfs_pointer(POINTER_SOURCE),  # a mirror that copied the pointer, not the file
    })
    return fake_hub


def _hf_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub"


def _cached_files(root: Path) -> list:
    """Every file or link in the blobs/ and snapshots/ trees (what a later run could pick up)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ("blobs" in p.parts or "snapshots" in p.parts
                                                           or p.name.endswith((".incomplete", ".part"))))


def _no_sleep(monkeypatch) -> None:
    """huggingface_hub sleeps 1 s between resume attempts; tests need not."""
    import huggingface_hub.file_download as fd

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(fd, "time", fake_time)


# ------------------------------------------------------------------------------------------- helpers
def test_sha256_file_streams(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(WEIGHTS * 5)
    assert H.sha256_file(path) == hashlib.sha256(WEIGHTS * 5).hexdigest()


@pytest.mark.parametrize("var", OFFLINE_VARS)
@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_is_offline_reads_env_at_call_time(monkeypatch, var, value, expected):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for other in OFFLINE_VARS:
        monkeypatch.delenv(other, raising=False)
    assert H.is_offline() is False
    monkeypatch.setenv(var, value)
    assert H.is_offline() is expected
    assert H.is_offline(True) is True
    assert H.is_offline(False) is expected


# -------------------------------------------------------------------------------------------- Hub files
def test_hub_download_then_cache_hit_makes_no_request(hub, tmp_path):
    path = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS),
                          size=len(WEIGHTS))
    assert path.read_bytes() == WEIGHTS
    assert _hf_cache(tmp_path) in path.parents
    cfg = H.hub_download(REPO, "config.json", revision=COMMIT)
    assert cfg.read_bytes() == CONFIG
    before = hub.count()
    assert before > 0
    again = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS),
                           size=len(WEIGHTS))
    assert again == path
    assert hub.count() == before


def test_hub_offline_reuses_cache_without_network(hub, monkeypatch):
    path = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    before = hub.count()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS)) == path
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert H.hub_download(REPO, "model.safetensors", revision=COMMIT, local_files_only=True) == path
    assert hub.count() == before


@pytest.mark.parametrize("how", ["env", "local_files_only"])
def test_hub_offline_missing_names_file_and_command(hub, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("VISUALAD_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        H.hub_download(REPO, "model.safetensors", revision=COMMIT, local_files_only=(how != "env") or None)
    msg = str(err.value)
    assert "model.safetensors" in msg and REPO in msg and COMMIT in msg
    assert f"huggingface-cli download {REPO} model.safetensors --revision {COMMIT}" in msg
    with pytest.raises(OfflineError, match="visualad download clip-l"):
        H.hub_download(REPO, "model.safetensors", revision=COMMIT, local_files_only=(how != "env") or None,
                       fetch_hint="clip-l")
    assert hub.count() == 0


def test_hub_wrong_revision_missing_file_missing_repo(hub):
    with pytest.raises(WeightsError, match="revision") as err:
        H.hub_download(REPO, "model.safetensors", revision=OTHER_COMMIT)
    assert not isinstance(err.value, OfflineError) and OTHER_COMMIT in str(err.value)
    with pytest.raises(WeightsError, match="does not exist") as err:
        H.hub_download(REPO, "nope.safetensors", revision=COMMIT)
    assert "nope.safetensors" in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        H.hub_download("nobody/nothing", "model.safetensors", revision=COMMIT)


def test_hub_branch_revision_warns_not_pinned(hub, caplog):
    with caplog.at_level(logging.WARNING, logger="visualad.weights.hub"):
        path = H.hub_download(REPO, "config.json", revision="main")
    assert path.read_bytes() == CONFIG
    assert "not pinned" in caplog.text


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_hub_mismatch_removes_blob_and_link(hub, tmp_path, bad):
    kwargs = {"sha256": "ab" * 32} if bad == "sha256" else {"size": len(WEIGHTS) + 1}
    with pytest.raises(WeightsError) as err:
        H.hub_download(REPO, "model.safetensors", revision=COMMIT, **kwargs)
    msg = str(err.value)
    if bad == "sha256":
        assert "ab" * 32 in msg and sha256_hex(WEIGHTS) in msg
    else:
        assert str(len(WEIGHTS) + 1) in msg and str(len(WEIGHTS)) in msg
    assert _cached_files(_hf_cache(tmp_path)) == []


def test_hub_corrupted_bytes_refused_then_recovers(hub, tmp_path):
    hub.set_mode(REPO, "model.safetensors", "corrupt")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    assert _cached_files(_hf_cache(tmp_path)) == []
    hub.set_mode(REPO, "model.safetensors", None)
    path = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    assert path.read_bytes() == WEIGHTS


def test_hub_corrupted_cache_is_replaced(hub, tmp_path, caplog):
    path = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    blob = path.resolve()
    os.chmod(blob, 0o644)
    blob.write_bytes(b"\0" * len(WEIGHTS))  # bit rot / a killed writer outside huggingface_hub
    with caplog.at_level(logging.WARNING, logger="visualad.weights.hub"):
        again = H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    assert again.read_bytes() == WEIGHTS
    assert "failed verification" in caplog.text


def test_hub_interrupted_transfer_leaves_nothing(hub, tmp_path, monkeypatch):
    _no_sleep(monkeypatch)
    hub.set_mode(REPO, "model.safetensors", "truncate")
    with pytest.raises(WeightsError) as err:
        H.hub_download(REPO, "model.safetensors", revision=COMMIT, sha256=sha256_hex(WEIGHTS))
    assert not isinstance(err.value, OfflineError)
    assert _cached_files(_hf_cache(tmp_path)) == []


def test_hub_lfs_pointer_refused(hub, tmp_path):
    with pytest.raises(WeightsError, match="LFS pointer") as err:
        H.hub_download(REPO, "weights/CLIP.pth", revision=COMMIT)
    assert sha256_hex(POINTER_SOURCE) in str(err.value)  # the pointer's oid, to help find the real file
    assert _cached_files(_hf_cache(tmp_path)) == []


# ------------------------------------------------------------------------------------------ Hub snapshots
def test_hub_snapshot_download_cache_offline(hub, monkeypatch):
    files = ["config.json", "model.safetensors", "references.safetensors"]  # the last one is optional
    folder = H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=files,
                            required=["config.json", "model.safetensors"],
                            sha256={"model.safetensors": sha256_hex(WEIGHTS)})
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert not (folder / "README.md").exists()
    before = hub.count()
    assert H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=files) == folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=files, required=["model.safetensors"]) == folder
    assert hub.count() == before


def test_hub_snapshot_errors(hub, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="revision"):
        H.hub_snapshot(REPO, revision=OTHER_COMMIT, allow_patterns=["config.json"])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=["model.safetensors"],
                       sha256={"model.safetensors": "cd" * 32})
    assert not any("model.safetensors" in f for f in _cached_files(_hf_cache(tmp_path)))
    with pytest.raises(WeightsError, match="LFS pointer"):
        H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=["weights/*"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="visualad download tiny"):
        H.hub_snapshot("other/repo", revision=COMMIT, fetch_hint="tiny")


def test_hub_files_without_a_pin_are_checked_against_the_digest_the_hub_states(hub, tmp_path):
    """A flipped LFS body (same length; huggingface_hub keeps it) and a flipped small file are refused by the
    sha256 / git sha1 the Hub stated for them, and leave the cache; once the Hub serves them right they load."""
    hub.set_mode(REPO, "model.safetensors", "corrupt")
    with pytest.raises(WeightsError, match="digest the Hub stated"):
        H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=["config.json", "model.safetensors"])
    assert not any("model.safetensors" in f or sha256_hex(WEIGHTS) in f for f in _cached_files(_hf_cache(tmp_path)))
    hub.set_mode(REPO, "model.safetensors", None)
    hub.set_mode(REPO, "README.md", "corrupt")
    with pytest.raises(WeightsError, match="digest the Hub stated"):
        H.hub_download(REPO, "README.md", revision=COMMIT)
    hub.set_mode(REPO, "README.md", None)
    assert H.hub_download(REPO, "README.md", revision=COMMIT).read_bytes() == b"# tiny\n"
    folder = H.hub_snapshot(REPO, revision=COMMIT, allow_patterns=["config.json", "model.safetensors"])
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS and (folder / "config.json").read_bytes() == CONFIG


# -------------------------------------------------------------------------------------------- plain URLs
URL_PATH = f"7HHHHH/VisualAD/raw/{COMMIT}/weight/train_on_visa/CLIP.pth"


def _url_cache(tmp_path: Path, data: bytes) -> Path:
    return tmp_path / "va" / "downloads" / sha256_hex(data)


def test_url_download_follows_redirect_then_cache_hit_offline(hub, tmp_path, monkeypatch):
    url = hub.add_url(URL_PATH, WEIGHTS)
    path = H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS))
    assert path == _url_cache(tmp_path, WEIGHTS) / "CLIP.pth"
    assert path.read_bytes() == WEIGHTS
    served = [(s, m, p.split("?")[0]) for s, m, p in hub.requests]
    assert ("hub", "GET", f"/gh/{URL_PATH}") in served and ("cdn", "GET", f"/media/{URL_PATH}") in served
    assert all(ua.startswith("visualad/") for ua in hub.user_agents)
    before = hub.count()
    assert H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS)) == path
    assert H.url_download(url, sha256=sha256_hex(WEIGHTS), local_files_only=True) == path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS)) == path
    assert hub.count() == before
    assert [p.name for p in path.parent.iterdir() if p.name != ".verified"] == ["CLIP.pth"]


def test_url_offline_missing_names_hint(hub, monkeypatch):
    url = hub.add_url(URL_PATH, WEIGHTS)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        H.url_download(url, sha256=sha256_hex(WEIGHTS), fetch_hint="clip-l")
    assert "CLIP.pth" in str(err.value) and "visualad download clip-l" in str(err.value)
    with pytest.raises(OfflineError, match="curl -L"):
        H.url_download(url, sha256=sha256_hex(WEIGHTS))
    assert hub.count() == 0


@pytest.mark.parametrize("mode", ["truncate", "corrupt", "status:500"])
def test_url_failures_leave_nothing(hub, tmp_path, mode):
    url = hub.add_url(URL_PATH, WEIGHTS, mode=mode)
    with pytest.raises(WeightsError) as err:
        H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS))
    msg = str(err.value)
    assert url in msg
    if mode == "corrupt":
        assert sha256_hex(WEIGHTS) in msg and H.sha256_file is not None and "got" in msg
    if mode == "truncate":
        assert str(len(WEIGHTS)) in msg
    folder = _url_cache(tmp_path, WEIGHTS)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_url_wrong_size_refused(hub, tmp_path):
    url = hub.add_url(URL_PATH, WEIGHTS)
    with pytest.raises(WeightsError, match="size"):
        H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS) - 10)
    folder = _url_cache(tmp_path, WEIGHTS)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_url_lfs_pointer_refused(hub, tmp_path):
    url = hub.add_url(URL_PATH, lfs_pointer(WEIGHTS))  # GitHub raw without the LFS redirect
    with pytest.raises(WeightsError, match="LFS pointer") as err:
        H.url_download(url, sha256=sha256_hex(WEIGHTS), size=len(WEIGHTS))
    assert url in str(err.value)
    folder = _url_cache(tmp_path, WEIGHTS)
    assert not folder.exists() or list(folder.iterdir()) == []


def test_url_not_found_and_unreachable(hub, tmp_path):
    with pytest.raises(WeightsError, match="HTTP 404"):
        H.url_download(hub.hub_url + "/gh/missing.pth", sha256=sha256_hex(WEIGHTS))
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(WeightsError, match="could not reach") as info:
        H.url_download(f"http://127.0.0.1:{port}/x.pth", sha256=sha256_hex(WEIGHTS))
    # the advice says where the file must go, and that it is checked there
    target = tmp_path / "va" / "downloads" / sha256_hex(WEIGHTS) / "x.pth"
    assert f"copy it to {target}" in str(info.value) and sha256_hex(WEIGHTS) in str(info.value)


def test_url_corrupted_cache_is_redownloaded(hub, tmp_path):
    url = hub.add_url(URL_PATH, WEIGHTS)
    path = H.url_download(url, sha256=sha256_hex(WEIGHTS))
    path.write_bytes(b"\0" * len(WEIGHTS))
    assert H.url_download(url, sha256=sha256_hex(WEIGHTS)).read_bytes() == WEIGHTS
