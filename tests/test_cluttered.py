"""Cluttered CIFAR-10 (the data set) and the instruments that read its boxes."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import leanvit  # noqa: F401  (registers the reference architectures)
from leanvit import adapt
from leanvit.data.cluttered import ClutterRecipe
from leanvit.data import DataError, load_dataset, make_loader
from leanvit.measure import count_macs
from leanvit.data import eval_transform
from leanvit.objects import (background_kept, boxes_as_seen, object_measures, object_recall, oracle_floor_of,
                             patch_object_weights, spearman)
from leanvit.training import SeededAugment

SAMPLE = "cluttered-cifar10-sample"


@pytest.fixture(scope="module")
def sample():
    return load_dataset(SAMPLE, split="test", limit=40)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit12_convstem_w128_cluttered").eval()


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_a_test_image_depends_on_its_object_alone(sample):
    whole = load_dataset(SAMPLE, split="test")
    for i in (0, 7, 39):
        img, label, box = sample[i]
        again = whole[whole.ids.index(sample.ids[i])]
        assert np.array_equal(pixels(img), pixels(again[0])) and label == again[1]
        assert torch.equal(box, again[2])


def test_the_box_holds_the_object_and_its_label(sample):
    source = load_dataset("cifar10-sample", split="test")
    for i in range(10):
        img, label, box = sample[i]
        obj = sample.ids[i]
        assert img.size == (64, 64) and label == source.targets[obj]
        x0, y0, x1, y1 = (box.numpy() * 64).round().astype(int)
        assert x1 - x0 == y1 - y0 and 16 <= x1 - x0 <= 40 and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
        want = source[obj][0].resize((x1 - x0, y1 - y0), Image.BICUBIC)
        assert np.array_equal(pixels(img)[y0:y1, x0:x1], pixels(want))


def test_the_background_is_texture_not_a_flat_colour(sample):
    stds = []
    for i in range(20):
        img, _, box = sample[i]
        mask = np.ones((64, 64), bool)
        x0, y0, x1, y1 = (box.numpy() * 64).round().astype(int)
        mask[y0:y1, x0:x1] = False
        stds.append(pixels(img)[mask].std())
    assert np.median(stds) > 3.0


def test_training_placements_change_with_the_epoch_and_repeat_with_it():
    train = load_dataset("cluttered-cifar10-sample", split="test").subset(range(8))
    train.train = True
    seeded = SeededAugment(train, seed=3)
    first = [seeded[i][2] for i in range(8)]
    assert all(torch.equal(a, seeded[i][2]) for i, a in enumerate(first))
    seeded.epoch = 1
    assert not all(torch.equal(a, seeded[i][2]) for i, a in enumerate(first))
    fixed = train.for_evaluation()
    assert all(torch.equal(fixed[i][2], fixed[i][2]) for i in range(8)) and not fixed.train


def test_the_sample_has_no_training_split_and_says_so():
    with pytest.raises(DataError, match="train"):
        load_dataset(SAMPLE, split="train")


def test_bad_recipes_and_specs_are_refused():
    with pytest.raises(ValueError, match="scale"):
        ClutterRecipe(scale=(30, 80))
    with pytest.raises(DataError, match="name the CIFAR-10"):
        load_dataset("cluttered:", split="test")


def test_batches_carry_the_boxes(sample, model):
    from leanvit.data import eval_transform
    loader = make_loader(sample.subset(range(8), eval_transform(model)), batch_size=4, num_workers=0)
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 64, 64) and batch.boxes.shape == (4, 4)
    assert torch.equal(batch.to("cpu").boxes, batch.boxes)
    assert torch.equal(batch.boxes[1], sample[1][2])


@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.9])
def test_boxes_follow_the_preprocessing_crop(model, crop_pct):
    """A white box drawn on a black canvas lands, after the model's own evaluation transform,
    where boxes_as_seen says (to a pixel of resampling blur)."""
    cfg = dict(model.pretrained_cfg, crop_pct=crop_pct)
    seen_model = timm.create_model("vit12_convstem_w128_cluttered")
    seen_model.pretrained_cfg = cfg
    for box in ([0.25, 0.125, 0.75, 0.5], [0.0, 0.5, 0.4375, 1.0]):
        canvas = np.zeros((64, 64, 3), np.uint8)
        x0, y0, x1, y1 = (np.array(box) * 64).astype(int)
        canvas[y0:y1, x0:x1] = 255
        seen = eval_transform(cfg)(Image.fromarray(canvas)).mean(0)
        rows, cols = np.nonzero((seen > seen.min() + 0.5 * (seen.max() - seen.min())).numpy())
        found = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / 64
        assert np.abs(boxes_as_seen(torch.tensor([box]), seen_model)[0].numpy() - found).max() <= 1.5 / 64
    if crop_pct < 1:  # the centre crop enlarges a box, and cuts one that reaches the canvas' edge
        assert boxes_as_seen(torch.tensor([[0.25, 0.25, 0.75, 0.75]]), seen_model)[0, 2] > 0.76


def test_preprocessing_boxes_cannot_follow_is_refused():
    squash = timm.create_model("vit12_convstem_w128_cluttered")
    squash.pretrained_cfg = dict(squash.pretrained_cfg, crop_mode="squash")
    with pytest.raises(ValueError, match="centre crop"):
        boxes_as_seen(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), squash)


def test_patch_weights_are_the_covered_areas():
    w = patch_object_weights(torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]]), 4).view(2, 4, 4)
    assert torch.allclose(w[0, 0, :2], torch.ones(2)) and float(w[0].sum()) == pytest.approx(2.0)
    assert float(w[1, 0, 0]) == pytest.approx(0.16) and float(w[1].sum()) == pytest.approx(0.16)


def test_recall_and_background_on_known_token_maps():
    # 4 patches, no prefix; the object covers patches 0 and 1 entirely
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    keep_0_2 = torch.eye(4)[[0, 2]][None]  # tokens standing for patch 0 and patch 2
    assert float(object_recall(keep_0_2, None, 0, weights)) == pytest.approx(0.5)
    assert float(background_kept(keep_0_2, None, 0, weights)) == pytest.approx(0.5)
    merged = torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])  # one token holding everything: recall 1, half background
    assert float(object_recall(merged, None, 0, weights)) == 1.0
    assert float(background_kept(merged, None, 0, weights)) == pytest.approx(0.5)
    padded = torch.eye(4)[[1, 3]][None]
    assert float(object_recall(padded, torch.tensor([[True, False]]), 0, weights)) == pytest.approx(0.5)


def test_spearman_matches_its_definition_and_refuses_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert spearman([5, 5, 5], [1, 2, 3]) is None


def test_random_recall_follows_its_keep_rate_and_the_oracle_beats_it(sample, model):
    from leanvit.data import eval_transform
    batch = next(iter(make_loader(sample.subset(range(40), eval_transform(model)), batch_size=40, num_workers=0)))
    runner = adapt(model, "random", keep_rate=0.5, independent=False)
    got = object_measures(runner, batch.images, batch.boxes)
    assert got["layers"] == [3, 6, 9]
    assert float(got["recall"][0].mean()) == pytest.approx(0.5, abs=0.1)
    with torch.inference_mode(), runner.tracing() as trace:
        runner(batch.images)
    oracle = object_measures(oracle_floor_of(runner, trace, patch_object_weights(batch.boxes, 8)),
                             batch.images, batch.boxes)
    assert torch.equal(oracle["tokens"], got["tokens"])  # the same counts ...
    assert float(oracle["recall"][0].mean()) > 0.95  # ... spent on the object first
    assert all(float(o.mean()) >= float(r.mean()) for o, r in zip(oracle["recall"], got["recall"]))
    assert all(float(o.mean()) < float(r.mean()) for o, r in zip(oracle["background"], got["background"]))


def test_the_cluttered_model_costs_what_the_reference_model_costs(model):
    reference = timm.create_model("vit12_convstem_w128_cifar").eval()
    cluttered = count_macs(adapt(model, "none"), torch.zeros(1, 3, 64, 64))
    plain = count_macs(adapt(reference, "none"), torch.zeros(1, 3, 32, 32))
    assert model.patch_embed.num_patches == 64 and cluttered <= 1.05 * plain


def test_the_object_report_reads_every_method_against_its_oracle(sample, model):
    from leanvit.data import eval_transform
    from leanvit.objects import object_report
    loader = make_loader(sample.subset(range(24), eval_transform(model)), batch_size=12, num_workers=0)
    runners = {"dense": adapt(model, "none"), "random": adapt(model, "random", keep_rate=0.5),
               "evit": adapt(model, "evit", keep_rate=0.5, fuse=False)}
    report = object_report(runners, loader)
    assert set(report) == {"random", "evit"}
    rnd = report["random"]
    assert set(rnd["object_recall"]) == {"3", "6", "9"} and rnd["adaptivity_tokens"] is not None
    assert report["evit"]["adaptivity_tokens"] is None  # the same tokens for every image
    # random tokens at a method's own counts recall about the share kept: random's floor is random again
    assert set(rnd["floor_object_recall"]) == {"3", "6", "9"}
    assert abs(rnd["floor_object_recall"]["3"] - rnd["object_recall"]["3"]) < 0.1
    assert rnd["floor_object_recall"]["9"] < rnd["floor_object_recall"]["3"] < 0.65
    assert rnd["oracle_floor_kl"] >= 0 and len(rnd["vs_oracle_floor"]["kl_to_dense_ci95"]) == 2
    plain = make_loader(load_dataset("cifar10-sample", split="test", limit=4, transform=eval_transform(model)),
                        batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="boxes"):
        object_report(runners, plain)


def test_eval_and_sweep_report_the_objects(tmp_path, capsys):
    import json
    from leanvit.cli import main
    common = ["--model", "vit12_convstem_w128_cluttered", "--data", SAMPLE, "--split", "test", "--limit", "20",
              "--batch-size", "10", "--workers", "0"]
    assert main(["eval", *common, "--method", "random", "--opt", "keep_rate=0.5",
                 "--json", str(tmp_path / "eval.json")]) == 0
    objects = json.loads((tmp_path / "eval.json").read_text())["objects"]
    assert set(objects["object_recall"]) == {"3", "6", "9"} and "vs_oracle_floor" in objects
    assert "recall first>last" in capsys.readouterr().out
    assert main(["sweep", *common, "--out", str(tmp_path / "sweep"), "--methods", "evit:keep_rate=0.5:fuse=false",
                 "tome:r=4"]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert all("object_recall" in r["objects"] for r in rows)
    assert "which tokens each method keeps" in (tmp_path / "sweep" / "table.txt").read_text()


def test_sweep_token_maps_frame_the_objects_boxes(tmp_path, monkeypatch):
    import leanvit.token_maps as maps
    from leanvit.cli import main
    drawn = {}
    draw = maps.token_maps

    def recording(runners, images, path, **kw):
        drawn.update(images=images, boxes=kw.get("boxes"))
        return draw(runners, images, path, **kw)

    monkeypatch.setattr(maps, "token_maps", recording)
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "vit12_convstem_w128_cluttered", "--data", SAMPLE, "--split", "test",
                 "--limit", "8", "--batch-size", "8", "--workers", "0", "--out", str(out),
                 "--methods", "evit:keep_rate=0.5"]) == 0
    assert (out / "token_maps.png").stat().st_size > 10_000
    data = load_dataset(SAMPLE, split="test", limit=8)
    assert drawn["images"].shape == (4, 3, 64, 64)  # the first four images, each with its own box
    assert torch.equal(drawn["boxes"], torch.stack([data[i][2] for i in range(4)]))
