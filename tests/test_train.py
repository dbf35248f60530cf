"""Fine-tuning: losses against hand formulas, the paper's schedule, exact resume, normal-only synthesis,
and the files a run leaves behind (loadable, no pickle). CPU, tiny random backbone, tiny datasets."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TIMM
from visualad import AnomalyDetector
from visualad.errors import ConfigError, DatasetError
from visualad.train import TrainConfig, build_optimizer, train_step
from visualad.train import losses as L
from visualad.train import synth
from visualad.train.loop import TrainingSet, load_checkpoint

SIZE = 56


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with two, OpenMP spin-waits under any CPU contention
    (a shared machine) made each step ~100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(seed: int = 0) -> AnomalyDetector:
    torch.manual_seed(seed)  # the random backbone is drawn from the global RNG
    return AnomalyDetector.from_backbone(device="cpu", pretrained_backbone=False, image_size=SIZE, **TINY_TIMM)


def _make_mvtec(root: Path, n_good: int = 3, n_bad: int = 3, with_anomalies: bool = True) -> Path:
    """<root>/widget/test/{good,crack}/NNN.png + ground_truth/crack/NNN_mask.png, 40x48 images."""
    rng = np.random.default_rng(0)
    cat = root / "widget"
    (cat / "test" / "good").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(rng.integers(90, 140, (40, 48, 3), dtype=np.uint8)).save(cat / "test/good" / f"{i:03d}.png")
    if with_anomalies:
        (cat / "test" / "crack").mkdir(parents=True)
        (cat / "ground_truth" / "crack").mkdir(parents=True)
        for i in range(n_bad):
            img = rng.integers(90, 140, (40, 48, 3), dtype=np.uint8)
            mask = np.zeros((40, 48), dtype=np.uint8)
            y, x = 5 + 4 * i, 8 + 5 * i
            img[y:y + 12, x:x + 14] = 250
            mask[y:y + 12, x:x + 14] = 255
            Image.fromarray(img).save(cat / "test/crack" / f"{i:03d}.png")
            Image.fromarray(mask).save(cat / "ground_truth/crack" / f"{i:03d}_mask.png")
    return root


# --- losses against direct formulas ---------------------------------------------------------------

def test_focal_matches_hand_computation():
    p = torch.tensor([[[0.2, 0.7], [0.5, 0.9]]])
    g = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    s = 1e-5
    expected = []
    for pi, gi in zip(p.flatten().tolist(), g.flatten().tolist()):
        onehot = [min(max(1.0 - gi, s), 1 - s), min(max(gi, s), 1 - s)]  # clamped [normal, anomaly]
        pt = onehot[0] * (1 - pi) + onehot[1] * pi + s
        expected.append(-((1 - pt) ** 2) * math.log(pt))
    assert L.focal_loss(p, g).item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_dice_bce_hinge_match_formulas():
    p = torch.tensor([[[0.2, 0.7], [0.5, 0.9]], [[0.1, 0.1], [0.1, 0.1]]])
    g = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d0 = 1 - (2 * (0.7 + 0.5) + 1) / (2.3 + 2 + 1)
    d1 = 1 - 1 / (0.4 + 0 + 1)
    assert L.dice_loss(p, g).item() == pytest.approx((d0 + d1) / 2, rel=1e-6)

    fused = torch.arange(200.0).view(2, 10, 10) / 100  # top 1% of 100 pixels = the max
    logits = torch.tensor([0.99, 1.99])
    y = torch.tensor([1.0, 0.0])
    bce = -(torch.log(torch.sigmoid(logits[0])) + torch.log(1 - torch.sigmoid(logits[1]))) / 2
    assert L.image_bce(fused, y, 0.01).item() == pytest.approx(bce.item(), rel=1e-6)

    a = torch.tensor([1.0, 0.0])
    tokens = torch.stack([torch.stack([a, torch.tensor([-1.0, 0.2])]),  # cos ~ -0.98 -> 0
                          torch.stack([a, torch.tensor([-0.5, math.sqrt(0.75)])]),  # cos = -0.5 -> 0
                          torch.stack([a, torch.tensor([0.0, 1.0])])])  # cos = 0 -> 0.5
    assert L.token_hinge(tokens[:2]).item() == pytest.approx(0.0, abs=1e-7)
    assert L.token_hinge(tokens).item() == pytest.approx(0.5 / 3, rel=1e-5)


def test_total_loss_is_sum_of_terms_and_mask_weighting():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 4, 4) * 4 - 2
    tokens = torch.randn(2, 2, 8)
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:9, 4:9] = 1
    labels = torch.tensor([1.0, 0.0])
    t = L.visualad_loss(maps, tokens, masks, labels, 16)
    assert t["total"].item() == pytest.approx((t["focal"] + t["dice"] + t["bce"] + t["hinge"]).item(), rel=1e-6)
    prob = torch.sigmoid(torch.nn.functional.interpolate(maps, size=(16, 16), mode="bilinear", align_corners=False))
    focal = sum(L.focal_loss(prob[:, i], masks) for i in range(3))
    assert t["focal"].item() == pytest.approx(focal.item(), rel=1e-6)
    # an image without a mask is left out of focal and dice only
    w = L.visualad_loss(maps, tokens, masks, labels, 16, seg_weight=torch.tensor([1.0, 0.0]))
    one = L.visualad_loss(maps[:1], tokens[:1], masks[:1], labels[:1], 16)
    assert w["focal"].item() == pytest.approx(one["focal"].item(), rel=1e-6)
    assert w["dice"].item() == pytest.approx(one["dice"].item(), rel=1e-6)
    assert w["bce"].item() == pytest.approx(t["bce"].item(), rel=1e-6)


# --- optimiser and schedule ----------------------------------------------------------------------

@pytest.mark.parametrize("epochs, token_lrs", [(1, [1e-3]), (2, [1e-3, 5.5e-4])])
def test_lr_schedule_matches_paper(tiny_detector, epochs, token_lrs):
    opt, sched = build_optimizer(tiny_detector.model, TrainConfig(epochs=epochs))
    names = [g["name"] for g in opt.param_groups]
    assert names[:3] == ["anomaly_token", "normal_token", "final_norm"] and names[-1] == "sca"
    assert sum(n.startswith("saf.") for n in names) == len(tiny_detector.config.layers)
    assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    n_head = sum(p.numel() for _, p in tiny_detector.model.head_parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_head
    for expected in token_lrs:
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["anomaly_token"] == pytest.approx(expected) and lrs["normal_token"] == pytest.approx(expected)
        assert all(v == pytest.approx(1e-4) for k, v in lrs.items() if not k.endswith("_token"))
        opt.step()
        sched.step()


def test_lr_shorthand_and_unknown_option():
    cfg = TrainConfig.from_overrides(lr=2e-3)
    assert (cfg.lr_tokens, cfg.lr_rest, cfg.eta_min) == (2e-3, pytest.approx(2e-4), pytest.approx(2e-4))
    with pytest.raises(ConfigError):
        TrainConfig.from_overrides(learning_rate=1.0)
    with pytest.raises(ConfigError):
        TrainConfig(amp="fp16")
    for bad in (dict(lr=float("nan")), dict(w_dice=float("inf")), dict(betas=(0.9, float("nan")))):
        with pytest.raises(ConfigError, match="not a finite number"):  # NaN passes "< 0" and poisons the run
            TrainConfig.from_overrides(**bad)


def test_overfitting_one_batch_lowers_the_loss(tiny_detector, tmp_path):
    data = TrainingSet(_make_mvtec(tmp_path / "aux"), SIZE, TrainConfig())
    batch = data._collate([data.load(i, 0) for i in range(len(data))])
    det = tiny_detector
    x = det.engine.prepare(list(batch.images))
    masks, labels, w = (torch.from_numpy(a) for a in (batch.masks, batch.labels, batch.has_mask))
    cfg = TrainConfig(lr_tokens=1e-2, lr_rest=1e-3, eta_min=1e-3)
    opt, _ = build_optimizer(det.model, cfg)
    det.model.train()
    losses = [train_step(det.model, x, masks, labels, w, opt, cfg, None)[0]["total"] for _ in range(15)]
    assert losses[-1] < losses[0]
    # gradients reached the input tokens through the frozen backbone, which stayed frozen
    assert det.model.encoder.anomaly_token.grad is not None
    assert not any(p.requires_grad for p in det.model.backbone.parameters())


# --- full runs -----------------------------------------------------------------------------------

def _head(det: AnomalyDetector):
    return {k: v.clone() for k, v in det.model.head_state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    aux = _make_mvtec(tmp_path / "aux")
    kw = dict(epochs=2, batch_size=4, progress=False)
    full = _tiny()
    report = full.finetune(aux, out_dir=tmp_path / "full", **kw)
    assert report["epochs"] == 2 and report["steps"] == 4 and len(report["history"]) == 2
    assert [h["lr"]["anomaly_token"] for h in report["history"]] == [pytest.approx(1e-3), pytest.approx(5.5e-4)]

    class Stop(Exception):
        pass

    def stop(epoch, stats):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        _tiny().finetune(aux, out_dir=tmp_path / "split", on_epoch_end=stop, **kw)
    _, state = load_checkpoint(tmp_path / "split" / "checkpoint")
    assert state["epoch"] == 1
    with pytest.raises(ConfigError, match="differ"):
        _tiny().finetune(aux, out_dir=tmp_path / "split", resume=True, batch_size=2, epochs=2, progress=False)
    resumed = _tiny()
    rep2 = resumed.finetune(aux, out_dir=tmp_path / "split", resume=True, **kw)
    assert rep2["resumed_from_epoch"] == 1 and len(rep2["history"]) == 2
    a, b = _head(full), _head(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert rep2["final_loss"] == pytest.approx(report["final_loss"], abs=1e-6)
    # the untouched initial head differs: training did change the weights
    assert not torch.allclose(_head(_tiny())["encoder.anomaly_token"], a["encoder.anomaly_token"])


def test_output_dir_loads_and_has_report_and_no_pickle(tmp_path):
    aux = _make_mvtec(tmp_path / "aux")
    det = _tiny()
    out = tmp_path / "model"
    report = det.finetune(aux, out_dir=out, epochs=1, batch_size=8, progress=False, deterministic=True,
                          num_workers=2, keep_checkpoint=True)
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards
    assert report["final_loss"] is not None and math.isfinite(report["final_loss"])
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["epochs"] == 1 and saved["steps"] == 1 and saved["data"]["n_anomalous"] == 3
    assert saved["train_config"]["deterministic"] is True
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin")]
    assert (out / "checkpoint" / "checkpoint.safetensors").is_file()
    loaded = AnomalyDetector.from_pretrained(out, device="cpu")
    assert loaded.config.metadata["training_data"]["n_images"] == 6
    for k, v in det.model.head_state_dict().items():
        torch.testing.assert_close(loaded.model.head_state_dict()[k], v)
    res = loaded.predict(np.full((30, 30, 3), 120, np.uint8))
    assert math.isfinite(res.pred_score)


def test_normal_only_synthesises_and_trains(tmp_path):
    aux = _make_mvtec(tmp_path / "aux", n_good=6, with_anomalies=False)
    data = TrainingSet(aux, SIZE, TrainConfig())
    assert data.synthetic
    items = [data.load(i, e) for e in range(4) for i in range(len(data))]
    anomalous = [it for it in items if it[2] == 1]
    assert anomalous and len(anomalous) < len(items)
    assert all(it[1].any() and it[3] for it in anomalous)
    assert all(not it[1].any() for it in items if it[2] == 0)
    again = data.load(2, 1)
    np.testing.assert_array_equal(again[0], data.load(2, 1)[0])  # deterministic per (seed, epoch, index)

    with pytest.raises(DatasetError, match="synthesize"):
        _tiny().finetune(aux, synthesize="never", progress=False)
    report = _tiny().finetune(aux, epochs=1, batch_size=3, progress=False)
    assert report["data"]["synthetic_anomalies"] and math.isfinite(report["final_loss"])


def test_synth_recipes_give_nonempty_masks():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for seed in range(10):
        r = synth.sample_rng(seed, 0, 0)
        out, mask = synth.cutpaste(img, r)
        assert mask.any() and out.shape == img.shape and out.dtype == np.uint8
        res = synth.perlin_blend(img, r, synth.shuffled_texture(img, r))
        if res is not None:
            assert res[1].any() and not res[1].all()
            assert (res[0][~res[1]] == img[~res[1]]).all()  # untouched outside the mask
    noise = synth.perlin_noise((50, 50), (4, 3), np.random.default_rng(0))
    assert noise.shape == (50, 50) and np.abs(noise).max() <= 1.5


def test_cli_finetune_and_resume_message(tmp_path, capsys):
    from visualad.cli import main

    aux = _make_mvtec(tmp_path / "aux")
    base = _tiny().save_pretrained(tmp_path / "base")
    out = tmp_path / "model"
    args = ["finetune", str(aux), "--out", str(out), "--model", str(base), "--device", "cpu", "--epochs", "1",
            "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["steps"] == 2
    assert main(args + ["--resume"]) != 0  # finished: nothing to resume, and the error says so
    assert "finished" in capsys.readouterr().err


def test_compiled_detector_trains_eagerly_and_keeps_its_compiled_call(tmp_path):
    """A detector compiled for inference trains through the eager forward (the compiled graph is eval-only)
    and gets its compiled call back afterwards, also when training fails."""
    aux = _make_mvtec(tmp_path / "aux")
    det = _tiny()

    def compiled_call(*args, **kwargs):
        raise AssertionError("training went through the compiled inference call")

    det.model._compiled_call_impl = compiled_call
    report = det.finetune(aux, epochs=1, batch_size=8, progress=False)
    assert math.isfinite(report["final_loss"])
    assert det.model._compiled_call_impl is compiled_call and not det.model.training
    with pytest.raises(ValueError):
        det.finetune(aux, epochs=1, batch_size=8, progress=False, on_epoch_end=_raise_value_error)
    assert det.model._compiled_call_impl is compiled_call


def _raise_value_error(epoch, stats):
    raise ValueError("stop")


def _goods(folder: Path, n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(90, 140, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("layout", ["mvtec_train_good_only", "plain_good_folder", "mixed_tree"])
def test_finetune_reads_the_layouts_users_have_and_the_result_loads(layout, tmp_path):
    root = tmp_path / "aux"
    if layout == "mvtec_train_good_only":  # ROOT/<category>/train/good/*.png and nothing else
        _goods(root / "widget" / "train" / "good", 4)
        want = {"test": 0, "train": 4}, {"widget": {"normal": 4, "anomalous": 0}}, True
    elif layout == "plain_good_folder":
        _goods(root / "good", 4)
        want = {"test": 4, "train": 0}, {"aux": {"normal": 4, "anomalous": 0}}, True
    else:  # train/good beside a labelled test split: the paper's protocol trains on the test split
        _make_mvtec(root, n_good=2, n_bad=2)
        _goods(root / "widget" / "train" / "good", 3)
        want = {"test": 4, "train": 0}, {"widget": {"normal": 2, "anomalous": 2}}, False
    report = _tiny().finetune(root, out_dir=tmp_path / "out", epochs=1, batch_size=2, progress=False)
    data = report["data"]
    assert (data["splits"], data["by_class"], data["synthetic_anomalies"]) == want
    assert report["start"].startswith("a fresh, untrained head")
    det = AnomalyDetector.from_pretrained(tmp_path / "out", device="cpu")
    assert det.config.head_trained and det.config.metadata["training_data"]["splits"] == data["splits"]
    if layout == "mixed_tree":  # asked for, the train normals join
        report = _tiny().finetune(root, epochs=1, batch_size=2, progress=False, include_train_normals=True)
        assert report["data"]["splits"] == {"test": 4, "train": 3}


def test_an_empty_tree_is_one_clear_error(tmp_path):
    (tmp_path / "aux" / "widget" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError):
        _tiny().finetune(tmp_path / "aux", epochs=1, progress=False)


def test_cli_and_python_finetune_start_from_the_same_head(monkeypatch, tmp_path, capsys):
    """No --model on the CLI and from_pretrained() in Python: both continue from the default model's head."""
    import visualad.train.loop as loop
    from visualad.cli import main

    starts = []

    def capture(engine, aux, **kwargs):
        starts.append(({k: v.detach().clone() for k, v in engine.model.head_state_dict().items()}, kwargs["start"]))
        return {"epochs": 0, "data": {"n_images": 0, "splits": {"test": 0, "train": 0}, "by_class": {},
                                      "synthetic_anomalies": False, "n_anomalous": 0, "n_anomalous_with_mask": 0}}

    monkeypatch.setattr(loop, "finetune", capture)
    _goods(tmp_path / "aux" / "good", 4)
    AnomalyDetector.from_pretrained(device="cpu").finetune(tmp_path / "aux", out_dir=tmp_path / "py")
    assert main(["finetune", str(tmp_path / "aux"), "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert "starting from the trained head of" in capsys.readouterr().err
    (py, py_start), (cli, cli_start) = starts
    assert py_start == cli_start and py_start.startswith("the trained head of")
    assert py.keys() == cli.keys() and all(torch.equal(py[k], cli[k]) for k in py)
    assert main(["finetune", str(tmp_path / "aux"), "--out", str(tmp_path / "fresh"), "--device", "cpu",
                 "--fresh-head"]) == 0
    fresh, fresh_start = starts[2]
    assert fresh_start.startswith("a fresh, untrained head") and not all(torch.equal(py[k], fresh[k]) for k in py)
