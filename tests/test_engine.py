"""The Engine: bounded read-ahead, normalisation buffers, the tensor entry, counted forwards, typed errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from visualad.data.images import resize_to_square
from visualad.errors import DatasetError, VisualADError
from visualad.modes.head import HeadMode


def _images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8) for _ in range(n)]


def test_read_ahead_holds_a_fixed_number_of_inputs_whatever_their_count(tiny_detector):
    pulled = []

    def stream():
        for i, img in enumerate(_images(60)):
            pulled.append(i)
            yield img

    run = tiny_detector.engine.run(stream(), HeadMode(), batch_size=4)
    first = next(run)
    assert first[0].ok and first[1].shape == (56, 56)
    assert len(pulled) <= 3 * 4  # two batches in flight plus the one being scored, not all 60
    rest = list(run)
    assert len(rest) == 59 and len(pulled) == 60


def test_pixels_are_dropped_unless_kept(tiny_detector):
    imgs = _images(3)
    assert all(r.image is None for r in tiny_detector.predict(imgs, keep_image=False, mode="head"))
    kept = tiny_detector.predict(imgs, keep_image=True, mode="head")
    assert all(np.array_equal(r.image, i) for r, i in zip(kept, imgs))


def test_normalisation_constants_are_buffers_that_move_and_are_not_saved(tiny_detector):
    model = tiny_detector.model
    names = dict(model.named_buffers())
    assert {"pixel_mean", "pixel_std"} <= set(names)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor(model.backbone.mean))
    assert not any("pixel_" in k for k in model.state_dict()) and not any("pixel_" in k for k in model.head_state_dict())


def test_tensor_entry_equals_the_array_entry(tiny_detector):
    eng = tiny_detector.engine
    squares = [resize_to_square(i, 56) for i in _images(2)]
    maps, scores = eng.score_arrays(squares, HeadMode())
    t_maps, t_scores = eng.score(eng.prepare(squares), HeadMode())
    np.testing.assert_array_equal(maps, t_maps)
    np.testing.assert_array_equal(scores, t_scores)


def test_calibrate_with_masks_runs_each_image_once(tiny_detector):
    normals, anomalous = _images(5, 1), _images(3, 2)
    masks = [np.zeros((40, 50), dtype=bool) for _ in anomalous]
    for m in masks:
        m[10:20, 10:20] = True
    eng = tiny_detector.engine
    eng.forwards = 0
    tiny_detector.calibrate(normals, anomalous, masks=masks, batch_size=2, mode="head")
    assert eng.forwards == 3 + 2  # ceil(5/2) + ceil(3/2) batches: every image once
    assert tiny_detector.config.pixel_threshold is not None


def test_calibrate_refuses_a_mask_of_another_size(tiny_detector):
    with pytest.raises(DatasetError, match="40x50"):
        tiny_detector.calibrate(_images(2, 1), _images(1, 2), masks=[np.ones((10, 10), dtype=bool)], mode="head")


def test_evaluate_with_shots_leaves_the_detectors_references(tiny_detector, shared_data):
    tiny_detector.set_references(_images(2, 3))
    bank = tiny_detector.references
    report = tiny_detector.evaluate(shared_data / "mvtec_ad_reduced", shots=2, progress=False)
    assert tiny_detector.references is bank
    assert {r["mode"] for r in report["classes"].values()} == {"references"}
    assert all(r["shots"] == 2 for r in report["classes"].values())


def test_shots_on_a_set_without_train_images_is_a_typed_error(tiny_detector, shared_data):
    with pytest.raises(VisualADError, match="train"):
        tiny_detector.evaluate(shared_data / "kvasir_seg", shots=1, progress=False)
