"""Scoring modes over one nearest-neighbour core: the core against brute force, batch mode's invariances and
its detection of a pasted defect on the real ViT-S, references and their persistence, thresholds per mode."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visualad.errors import ConfigError, WeightsError
from visualad.modes import knn
from visualad.modes.batch import BatchMode
from visualad.modes.bank import ReferenceBank


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _images(n, seed=0, size=56):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_products_stay_in_their_inputs_dtype_inside_a_bf16_autocast_region():
    """References mode scores inside the engine's autocast region; its fp32 rows must not be rounded to bf16."""
    q, b = _unit(3, 100, 64, seed=11), _unit(500, 64, seed=12)
    exact = torch.cdist(q.reshape(-1, 64), b).min(dim=1).values.reshape(1, 3, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(q, b.t()).dtype == torch.bfloat16  # what autocast does to a plain product
        got = knn.nearest_distance(q, b, rs=(1,))
        own = knn.nearest_outside_neighbourhood(q[0], q[0], rs=(1, 3))
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(own, knn.nearest_outside_neighbourhood(q[0], q[0], rs=(1, 3)), atol=1e-6, rtol=0)


def test_a_held_out_reference_is_scored_from_the_bank_as_a_forward_against_the_others_would(tiny_detector):
    from visualad.modes.references import ReferencesMode

    tiny_detector.to("cpu", "fp32")
    refs = _images(4, seed=8)
    engine = tiny_detector.engine
    engine.forwards = 0
    tiny_detector.set_references(refs, calibrate=True)
    assert engine.forwards == 1 and tiny_detector.has_thresholds("references")  # the bank's one batch only
    mode = tiny_detector.scoring_mode("references")
    held = mode.holdout(mode.bank.digests[1])
    maps, scores = engine.score(engine.prepare([refs[1]]), held)
    assert engine.forwards == 1  # no forward: its features are the bank's
    others = engine.build_references([refs[0], refs[2], refs[3]])
    want_maps, want = engine.score(engine.prepare([refs[1]]), ReferencesMode(others))
    np.testing.assert_allclose(scores, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(maps, want_maps, atol=1e-5, rtol=0)


def test_nearest_distance_chunked_equals_cdist():
    q, b = _unit(7, 9, 16, seed=1), _unit(6 * 9, 16, seed=2)
    brute = torch.cdist(q.reshape(-1, 16), b).min(dim=1).values.reshape(1, 7, 9)
    for chunk in (1, 6 * 81, 7 * 6 * 81, 10**6):
        torch.testing.assert_close(knn.nearest_distance(q, b, (1,), chunk_elements=chunk), brute, atol=1e-5, rtol=0)


def test_core_takes_bf16_features_and_computes_fp32_distances():
    """The same code serves CPU and CUDA; under bf16 features the distances are fp32."""
    f = _unit(6, 16, 8, seed=3).to(torch.bfloat16)
    d = knn.mutual_distances(f, 5, (1, 3))
    assert d.dtype == torch.float32 and d.shape == (2, 6, 5, 16)
    assert knn.nearest_distance(f[:1], f[1], (1, 3)).dtype == torch.float32


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_features_pick_the_nearest_in_half_and_give_its_fp32_similarity(half, monkeypatch):
    """Half products (CUDA's; here made to run on the CPU) only choose the nearest row; the value is the fp32
    dot product of the two stored rows: never above the exact maximum over the stored rows, below it only by a
    near tie of the half product. Off those devices half rows are multiplied in fp32: the exact maxima."""
    a, b = _unit(6, 40, 64, seed=21).to(half), _unit(6, 50, 64, seed=22).to(half)
    upcast = [s[0] for s in knn.nearest_similarities(a, b, (1,), both=True)]
    monkeypatch.setattr(knn, "HALF_PRODUCTS", {"cuda": torch.float16, "cpu": half})
    exact = torch.matmul(knn.aggregated(a, 1), knn.aggregated(b, 1).transpose(-1, -2))  # the stored rows, in fp32
    rows, cols = (s[0] for s in knn.nearest_similarities(a, b, (1,), both=True))
    assert rows.dtype == cols.dtype == torch.float32 and rows.shape == (6, 40) and cols.shape == (6, 50)
    ulp = 2.0 ** -8 if half == torch.bfloat16 else 2.0 ** -11  # the half product's spacing near 1
    for got, want in ((rows, exact.amax(dim=-1)), (cols, exact.amax(dim=-2))):
        assert (got <= want + 1e-6).all() and (got >= want - 2 * ulp).all()
        assert torch.isclose(got, want, atol=1e-6).float().mean() > 0.98  # nearly always among the candidates
    # every value is the similarity of a real pair of rows (not a rounded product)
    assert all(torch.isclose(exact[i, j].unsqueeze(-1), rows[i, j], atol=1e-6).any() for i in range(6)
               for j in range(40))
    f32 = knn.mutual_distances(_unit(9, 16, 32, seed=23), 8, (1, 3))
    f16 = knn.mutual_distances(_unit(9, 16, 32, seed=23).to(half), 8, (1, 3))
    torch.testing.assert_close(f16, f32, atol=0.01, rtol=0)  # the storage rounding and near ties only
    for got, want in zip(upcast, (exact.amax(dim=-1), exact.amax(dim=-2))):  # on the CPU: fp32 products
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("product", [torch.float16, torch.bfloat16])
def test_fp32_rows_asked_for_half_candidates_keep_fp32_similarities_of_real_pairs(product, monkeypatch):
    """References mode's rule: fp32 rows, the candidates picked by the device's half product (CUDA's fp16; here
    made to run on the CPU, and bf16 as a CPU with native bf16 would), their similarities the fp32 dot products
    of the given rows. Off those devices the request changes nothing: the exact fp32 search."""
    q, bank = _unit(300, 64, seed=31), _unit(600, 64, seed=32)  # two bank images of 300 rows
    exact = knn.aggregated(q, 1) @ knn.aggregated(bank, 1).t()
    brute = knn.to_distance(exact.amax(dim=1)).reshape(1, 1, 300)
    torch.testing.assert_close(knn.nearest_distance(q[None], bank, (1,), half_candidates=True), brute, atol=1e-6,
                               rtol=0)
    monkeypatch.setattr(knn, "HALF_PRODUCTS", {"cuda": torch.float16, "cpu": product})
    torch.testing.assert_close(knn.nearest_distance(q[None], bank, (1,)), brute, atol=1e-6, rtol=0)  # not asked
    sim = knn.nearest_similarities(q, bank, (1,), half_candidates=True)[0][0]
    ulp = 2.0 ** -8 if product == torch.bfloat16 else 2.0 ** -11  # the half product's spacing near 1
    assert sim.dtype == torch.float32 and sim.shape == (300,)
    assert (sim <= exact.amax(dim=1) + 1e-6).all() and (sim >= exact.amax(dim=1) - 2 * ulp).all()
    assert torch.isclose(sim, exact.amax(dim=1), atol=1e-6).float().mean() > 0.98
    assert all(torch.isclose(exact[i], sim[i], atol=1e-6).any() for i in range(300))  # a real pair's fp32 value


def test_references_pick_candidates_in_the_compact_dtype_where_asked_and_exactly_under_fp32(tiny_detector,
                                                                                         monkeypatch):
    """An engine under "auto" asks references mode for fp16 candidates (taken on CUDA's devices, here patched to
    the CPU); dtype="fp32" asks for none: the exact search. Either way scores agree to fp16's near ties."""
    monkeypatch.setattr(knn, "HALF_PRODUCTS", {"cuda": torch.float16, "cpu": torch.float16})
    picked = []
    best_dot = knn._best_dot
    monkeypatch.setattr(knn, "_best_dot", lambda a, b, index: picked.append(a.dtype) or best_dot(a, b, index))
    tiny_detector.set_references(_images(4, seed=7))
    images = _images(6, seed=8)
    out = {}
    for dtype in ("fp32", "auto"):
        tiny_detector.to("cpu", dtype)
        picked.clear()
        out[dtype] = np.array([r.pred_score for r in tiny_detector.predict(images, mode="references")])
        assert picked == ([] if dtype == "fp32" else [torch.float32] * 2)  # one per r: fp32 rows
    np.testing.assert_allclose(out["auto"], out["fp32"], atol=2e-3, rtol=0)


def test_auto_and_half_engines_keep_fp16_features_and_fp32_by_name_keeps_the_exact_fp32(tiny_detector):
    from visualad.runtime.precision import feature_dtype_for

    assert feature_dtype_for("auto", torch.float32) == feature_dtype_for("auto", torch.bfloat16) == torch.float16
    assert feature_dtype_for("bf16", torch.bfloat16) == feature_dtype_for(torch.float16, torch.float16) == torch.float16
    assert feature_dtype_for("fp32", torch.float32) == feature_dtype_for(torch.float32, torch.float32) == torch.float32
    engine = tiny_detector.engine
    x = engine.prepare(_images(2))
    for dtype, want in (("fp32", torch.float32), ("bf16", torch.float16), ("auto", torch.float16)):
        engine.to("cpu", dtype)
        assert {f.dtype for f in engine.features(x, (2,)).values()} == {want}
    images = _images(10, seed=4)
    engine.to("cpu", "auto")
    assert tiny_detector.with_fresh_head().engine.feature_dtype == torch.float16  # a rebuilt engine asks alike
    compact = [s for _, _, s in engine.run(images, BatchMode(), batch_size=4)]
    engine.to("cpu", "fp32")
    exact = [s for _, _, s in engine.run(images, BatchMode(), batch_size=4)]
    assert compact != exact  # the features were rounded ...
    np.testing.assert_allclose(compact, exact, atol=2e-3, rtol=0)  # ... by fp16's 2^-11, not more


def test_a_set_is_stored_once_whether_its_length_is_known_or_not(tiny_detector):
    """Batch mode allocates the set's features for the inputs' count (a list) or grows them (a generator);
    a broken input leaves a row unused; the results are the same either way."""
    tiny_detector.to("cpu", "fp32")
    imgs = _images(19, seed=31)
    inputs = imgs[:7] + ["/nonexistent/broken.png"] + imgs[7:]
    mode = BatchMode(compare_with=8)
    listed = list(tiny_detector.engine.run(inputs, mode, batch_size=4))
    streamed = list(tiny_detector.engine.run(iter(inputs), mode, batch_size=4))
    assert [x.ok for x, _, _ in listed] == [x.ok for x, _, _ in streamed] == [i != 7 for i in range(20)]
    np.testing.assert_array_equal([s for _, _, s in listed], [s for _, _, s in streamed])
    for (_, a, _), (_, b, _) in zip(listed, streamed):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_a_long_input_is_scored_in_sets_of_at_most_max_set_in_input_order(tiny_detector):
    """max_set=16: the first 16 good images are a set once 4 more have come; so are the next 16; the last 8 are
    one set. A list and a generator split alike, and a broken input keeps its place without moving a set."""
    tiny_detector.to("cpu", "fp32")
    imgs = _images(40, seed=41)
    inputs = imgs[:10] + ["/nonexistent/broken.png"] + imgs[10:]
    split = BatchMode(compare_with=8, max_set=16)
    for given in (inputs, iter(inputs)):
        rows = list(tiny_detector.engine.run(given, split, batch_size=4))
        assert [x.ok for x, _, _ in rows] == [i != 10 for i in range(41)] and np.isnan(rows[10][2])
        want = []
        for part in (imgs[:16], imgs[16:32], imgs[32:]):
            want += [s for _, _, s in tiny_detector.engine.run(part, BatchMode(compare_with=8), batch_size=4)]
        np.testing.assert_allclose([s for i, (_, _, s) in enumerate(rows) if i != 10], want, atol=1e-6, rtol=0)
    rows = list(tiny_detector.engine.run(imgs[:18], split, batch_size=4))  # 18 > 16, never 20: two halves
    want = [s for part in (imgs[:9], imgs[9:18])
            for _, _, s in tiny_detector.engine.run(part, BatchMode(compare_with=8), batch_size=4)]
    np.testing.assert_allclose([s for _, _, s in rows], want, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="max_set must be >= 16"):
        BatchMode(max_set=8)


def test_auto_picks_batch_mode_for_any_long_input():
    from visualad.modes.choice import MAX_SET, ModeChooser

    for n in (16, MAX_SET, 50 * MAX_SET):
        assert ModeChooser().choose("auto", False, n, head_trained=True) == "batch"
    assert BatchMode().why(5000, True).startswith(f"5000 images scored against each other in sets of at most {MAX_SET}")


def _partners(p, n, m):
    both, forward = knn.partner_offsets(n, m)
    out = []
    for off in both:
        out += [(p + off) % n, (p - off) % n]
    return out + [(p + off) % n for off in forward]


@pytest.mark.parametrize("n,m", [(7, 6), (7, 10), (8, 7), (9, 4), (9, 5), (12, 1)])
def test_mutual_distances_match_brute_force_partner_by_partner(n, m):
    """Each image meets exactly min(m, n - 1) others; the core keeps the ``keep`` smallest distances, ascending."""
    f = _unit(n, 9, 8, seed=n + m)
    d = knn.mutual_distances(f, m, (1,), chunk_images=2)[0]
    want = min(m, n - 1)
    assert d.shape == (n, want, 9)
    for p in range(n):
        partners = _partners(p, n, m)
        assert len(set(partners)) == want and p not in partners
        brute = torch.stack([torch.cdist(f[p], f[j]).min(dim=1).values for j in partners]).sort(dim=0).values
        torch.testing.assert_close(d[p], brute, atol=1e-5, rtol=0)
        for keep in (1, 2):
            lowest = knn.mutual_distances(f, m, (1,), chunk_images=3, keep=keep)[0]
            torch.testing.assert_close(lowest[p], brute[:keep], atol=1e-5, rtol=0)


def test_mutual_distances_index_through_the_order_without_copying_the_set():
    f = _unit(7, 9, 8, seed=11)
    order = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    torch.testing.assert_close(knn.mutual_distances(f, 4, (1, 3), order=order),
                               knn.mutual_distances(f[order], 4, (1, 3)), atol=0, rtol=0)


def test_distances_to_images_match_brute_force_in_any_chunk():
    q, imgs = _unit(9, 8, seed=12), _unit(5, 11, 8, seed=13)
    brute = torch.stack([torch.cdist(q, im).min(dim=1).values for im in imgs])[None]
    for chunk in (1, 99, 10**6):
        torch.testing.assert_close(knn.distances_to_images(q, imgs, (1,), chunk_elements=chunk), brute, atol=1e-5,
                                   rtol=0)


def test_one_product_serves_every_r_as_the_definition_does_on_both_cores():
    """The torch core multiplies layer-normed rows once and derives each r by a box filter on both grids; the
    definition (MuSc's LNAMD, and the NumPy core) aggregates the rows per r and multiplies each: every search
    gives the same distances."""
    from visualad.onnx import knn as npknn

    feats = torch.randn(5, 36, 16, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    rows, rs = knn.layer_normed(feats), (1, 3, 5)
    units = {r: knn.lnamd(feats, r) for r in rs}

    def brute(a, b):
        return torch.cdist(a, b).min(dim=1).values

    mutual = knn.mutual_distances(rows, 4, rs, chunk_images=2)
    refs = knn.nearest_distance(rows[:2], rows[2:].reshape(-1, 16), rs, chunk_elements=36 * 36 * 3)
    past = knn.distances_to_images(rows[0], rows[1:], rs)
    own = knn.nearest_outside_neighbourhood(rows[0], rows[0], rs)
    g = torch.arange(36)
    near = ((g[:, None] // 6 - g[None] // 6).abs() <= 1) & ((g[:, None] % 6 - g[None] % 6).abs() <= 1)
    for i, r in enumerate(rs):
        u = units[r]
        for p in range(5):
            want = torch.stack([brute(u[p], u[j]) for j in _partners(p, 5, 4)]).sort(dim=0).values
            torch.testing.assert_close(mutual[i, p], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(refs[i], brute(u[:2].reshape(-1, 16), u[2:].reshape(-1, 16)).reshape(2, 36),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(past[i], torch.stack([brute(u[0], u[j]) for j in range(1, 5)]), atol=1e-5, rtol=0)
        sim = (u[0] @ u[0].t()).masked_fill(near, -1.0)
        torch.testing.assert_close(own[i], knn.to_distance(sim.amax(dim=1)), atol=1e-5, rtol=0)
    x = rows.numpy()
    np.testing.assert_allclose(npknn.mutual_distances(x, 4, rs, order=range(5)), mutual.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(npknn.nearest_distance(x[:2], x[2:].reshape(-1, 16), rs), refs.numpy(), atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(npknn.distances_to_images(x[0], x[1:], rs), past.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(npknn.nearest_outside_neighbourhood(x[0], x[0], rs), own.numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="square grid"):
        knn.mutual_distances(rows[:, :35], 4, rs)


def test_a_bank_of_schema_three_scores_as_before_and_is_written_back_as_it_was(tmp_path):
    """Unit rows per (block, r) of schema 3 are scored as they are, and equal a new bank's layer-normed rows."""
    from visualad.modes.bank import build_bank

    feats = torch.randn(4, 36, 16, generator=torch.Generator().manual_seed(6))
    query = [torch.randn(2, 36, 16, generator=torch.Generator().manual_seed(7))]
    old = ReferenceBank({(2, r): knn.lnamd(feats, r).reshape(-1, 16) for r in (1, 3)}, image_size=84, patches=36,
                        rows="lnamd", digests=list("abcd"))
    old.save(tmp_path / "old.safetensors")
    loaded = ReferenceBank.load(tmp_path / "old.safetensors")
    assert loaded.rows == "lnamd" and loaded.rs == (1,) and loaded.fingerprint == old.fingerprint
    new = build_bank(((d, [feats[i:i + 1]]) for i, d in enumerate("abcd")), (2,), (1, 3), 84)
    assert new.rows == "layernorm" and new.rs == (1, 3) and new.nbytes * 2 == old.nbytes  # one copy, not one per r
    want = new.grid(new.query(query))
    torch.testing.assert_close(loaded.grid(loaded.query(query)), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.grid(loaded.query(query), exclude=1), new.grid(new.query(query), exclude=1),
                               atol=1e-5, rtol=0)
    for bad in ([2], [1, 3, 200]):
        with pytest.raises(WeightsError, match="odd sizes"):
            ReferenceBank({2: feats.reshape(-1, 16)}, image_size=84, patches=36, rs=bad).check()


def test_interval_average_is_the_mean_of_the_lowest_fraction():
    d = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 9.0, 8.0, 7.0, 6.0, 0.5]]).T[None]  # [1, M=10, P=1]
    assert knn.interval_average(d, 0.1).item() == pytest.approx(0.5)
    assert knn.interval_average(d, 0.3).item() == pytest.approx((0.5 + 1 + 2) / 3)
    assert knn.blocks_for_depth(12) == (7,) and knn.blocks_for_depth(24) == (14,)


@pytest.mark.parametrize("compare_with", [3, 64])
def test_batch_results_do_not_depend_on_the_order_of_the_images(tiny_detector, compare_with):
    imgs = _images(9, 4)
    a = tiny_detector.predict(imgs, mode="batch", compare_with=compare_with)
    perm = [4, 0, 8, 2, 6, 1, 7, 3, 5]
    b = tiny_detector.predict([imgs[i] for i in perm], mode="batch", compare_with=compare_with)
    for j, i in enumerate(perm):  # equal up to the float rounding of a different batch composition
        np.testing.assert_allclose(a[i].anomaly_map, b[j].anomaly_map, atol=1e-5, rtol=0)
        assert a[i].pred_score == pytest.approx(b[j].pred_score, abs=1e-5) and a[i].mode == "batch"
    spread = np.ptp([r.pred_score for r in a])
    assert spread > 1e-3  # the images do differ: equality above is not a constant map


def test_batch_mode_needs_four_images_and_warns_below_sixteen(tiny_detector, caplog):
    with pytest.raises(ConfigError, match="at least 4"):
        tiny_detector.predict(_images(3), mode="batch")
    with caplog.at_level(logging.WARNING, logger="visualad.modes.batch"):
        tiny_detector.predict(_images(5), mode="batch")
    assert "below 16 images" in caplog.text


def test_auto_picks_batch_for_sixteen_images_and_the_head_with_a_warning_below(tiny_detector, caplog):
    tiny_detector.model.config.head_trained = True  # the rule for a trained head (the flag finetune sets)
    with caplog.at_level(logging.WARNING, logger="visualad.detector"):
        assert {r.mode for r in tiny_detector.predict(_images(3))} == {"head"}
    assert "transfers poorly" in caplog.text
    assert {r.mode for r in tiny_detector.predict(_images(16, 5))} == {"batch"}
    tiny_detector.set_references(_images(2, 6))
    assert {r.mode for r in tiny_detector.predict(_images(16, 5))} == {"references"}


def test_auto_never_picks_an_untrained_head(tiny_detector, caplog):
    assert tiny_detector.config.head_trained is False  # from_backbone: a fresh head
    with pytest.raises(ConfigError, match="untrained.*4 or more images.*finetune"):
        tiny_detector.predict(_images(3))
    assert {r.mode for r in tiny_detector.predict(_images(4, 2))} == {"batch"}
    with caplog.at_level(logging.WARNING, logger="visualad.detector"):
        assert tiny_detector.predict(_images(1, 3), mode="head")[0].mode == "head"
    assert "untrained head: its maps mean nothing" in caplog.text


def test_a_patch_pasted_into_one_normal_image_gets_the_maximum_of_its_map(imgfocus_detector, shared_data):
    """Real DINOv2-S/14: 16 normal hazelnuts, a 56 px square of transistor pasted into one."""
    from PIL import Image

    good = sorted((shared_data / "mvtec_ad_reduced/hazelnut/train/good").iterdir())[:16]
    imgs = [np.asarray(Image.open(p).convert("RGB")) for p in good]
    donor = np.asarray(Image.open(sorted((shared_data / "mvtec_ad_reduced/transistor/train/good").iterdir())[0])
                       .convert("RGB"))
    y0, x0, s = 150, 60, 40
    pasted = imgs[5].copy()
    pasted[y0:y0 + s, x0:x0 + s] = donor[100:100 + s, 100:100 + s]
    imgs[5] = pasted
    res = imgfocus_detector.predict(imgs, mode="batch")
    amap = res[5].anomaly_map
    yy, xx = np.unravel_index(np.argmax(amap), amap.shape)
    assert y0 <= yy < y0 + s and x0 <= xx < x0 + s
    scores = np.array([r.pred_score for r in res])
    assert int(np.argmax(scores)) == 5


def test_zero_references_means_no_references(tiny_detector):
    tiny_detector.model.config.head_trained = True  # so that "auto" without references is the head
    imgs = _images(3, 7)
    head = tiny_detector.predict(imgs, mode="head")
    tiny_detector.set_references([])
    assert tiny_detector.references is None
    again = tiny_detector.predict(imgs, mode="auto")
    for a, b in zip(head, again):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    with pytest.raises(ConfigError, match="reference images"):
        tiny_detector.predict(imgs, mode="references")


def test_references_persist_and_score_the_same_after_loading(tiny_detector, tmp_path):
    from visualad import AnomalyDetector

    tiny_detector.set_references(_images(3, 8))
    imgs = _images(2, 9)
    before = tiny_detector.predict(imgs)
    d = tiny_detector.save_pretrained(tmp_path / "m")
    meta = json.loads(__import__("safetensors").safe_open(str(d / "references.safetensors"), "pt").metadata()
                      ["visualad_references"])
    assert meta["schema"] == "4" and meta["shots"] == 3 and len(meta["digests"]) == 3 and meta["r"] == [1, 3]
    loaded = AnomalyDetector.from_pretrained(d, device="cpu")
    after = loaded.predict(imgs)
    for a, b in zip(before, after):
        assert b.mode == "references"
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_a_bank_of_schema_two_is_read_as_references_alone(tmp_path, caplog):
    from visualad.weights.safe import save_safetensors

    feats = _unit(2 * 16, 8, seed=5)
    meta = {"schema": "2", "shots": 2, "layers": [2], "feature": "backbone", "image_size": 56,
            "stats": {}, "weights": [0.1, 0.9]}
    save_safetensors({"layer_2": feats}, tmp_path / "old.safetensors",
                     metadata={"visualad_references": json.dumps(meta)})
    with caplog.at_level(logging.WARNING):
        bank = ReferenceBank.load(tmp_path / "old.safetensors")
    assert bank.blocks == (2,) and bank.rs == (1,) and bank.shots == 2 and bank.rows == "unit"
    assert "schema 2" in caplog.text
    meta["schema"] = "1"
    save_safetensors({"layer_2": feats}, tmp_path / "v1.safetensors",
                     metadata={"visualad_references": json.dumps(meta)})
    with pytest.raises(WeightsError, match="set the references again"):
        ReferenceBank.load(tmp_path / "v1.safetensors")
    save_safetensors({"block_2_r_1": feats}, tmp_path / "bad.safetensors",
                     metadata={"visualad_references": json.dumps({"schema": "3"})})
    with pytest.raises(WeightsError, match="malformed"):
        ReferenceBank.load(tmp_path / "bad.safetensors")


def test_head_thresholds_are_not_applied_in_references_mode(tiny_detector, caplog):
    imgs = _images(4, 10)
    tiny_detector.calibrate(imgs, mode="head")
    assert tiny_detector.predict(imgs[0], mode="head").pred_label is not None
    tiny_detector.set_references(_images(2, 11))
    with caplog.at_level(logging.WARNING, logger="visualad.runtime.postprocess"):
        res = tiny_detector.predict(imgs)
        tiny_detector.predict(imgs)
    assert all(r.mode == "references" and r.pred_label is None for r in res)
    assert caplog.text.count("calibrated in head mode") == 1
    tiny_detector.calibrate(imgs)  # now in references mode, against this bank
    assert tiny_detector.config.score_stats["mode"] == "references"
    assert all(r.pred_label is not None for r in tiny_detector.predict(imgs))


def test_calibrating_on_the_references_themselves_is_leave_one_out(tiny_detector):
    refs = _images(3, 12)
    tiny_detector.set_references(refs)
    out = tiny_detector.calibrate(refs)
    assert out["mode"] == "references"
    # scored against the bank with itself in it, a reference is near 0 (bf16 rounding only); left out, it is not
    itself = tiny_detector.predict(refs[0]).pred_score
    assert itself < 0.2 * out["min"]


def test_eval_in_batch_mode_scores_each_category_as_its_own_set(tiny_detector, shared_data, monkeypatch):
    sizes = []
    original = BatchMode.score_set

    def spy(self, backend, features, digests):
        sizes.append(len(digests))
        return original(self, backend, features, digests)

    monkeypatch.setattr(BatchMode, "score_set", spy)
    report = tiny_detector.evaluate(shared_data / "mvtec_ad_reduced", mode="batch", progress=False)
    assert sizes == [r["n_images"] for r in report["classes"].values()] == [10, 10]
    assert {r["mode"] for r in report["classes"].values()} == {"batch"}


def test_stream_warms_up_as_a_set_then_scores_each_image_against_its_window(tiny_detector):
    imgs = _images(10, 21)
    out = list(tiny_detector.stream(imgs, window=4, warmup=5, batch_size=3))
    assert len(out) == 10 and {r.mode for r in out} == {"batch"}
    # the warm-up images are the batch-mode scores of those five images as one set
    first = tiny_detector.predict(imgs[:5], mode="batch", compare_with=4)
    for a, b in zip(out[:5], first):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5, rtol=0)
    # image 9 sees images 5..8 only: changing an image before its window changes nothing, inside it does
    changed_old = list(tiny_detector.stream(imgs[:4] + _images(1, 22) + imgs[5:], window=4, warmup=5))
    np.testing.assert_array_equal(changed_old[9].anomaly_map, out[9].anomaly_map)
    changed_in = list(tiny_detector.stream(imgs[:8] + _images(1, 23) + imgs[9:], window=4, warmup=5))
    assert np.abs(changed_in[9].anomaly_map - out[9].anomaly_map).max() > 1e-4


def test_stream_keeps_order_around_broken_inputs_and_refuses_too_short_streams(tiny_detector, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    items = _images(3, 31) + [str(bad)] + _images(4, 32)
    out = list(tiny_detector.stream(iter(items), window=8, warmup=4, on_error="return"))
    assert [r.ok for r in out] == [True] * 3 + [False] + [True] * 4 and "bad.png" in out[3].error
    short = list(tiny_detector.stream(_images(5, 33), window=8, warmup=16))  # ends before the warm-up: one set
    assert len(short) == 5 and all(np.isfinite(r.pred_score) for r in short)
    with pytest.raises(ConfigError, match="at least 4"):
        list(tiny_detector.stream(_images(3, 34), window=8, warmup=4))
    with pytest.raises(ConfigError, match="warmup"):
        tiny_detector.stream(_images(3, 34), window=8, warmup=3)
