"""Tests for leanvit.data: real CIFAR-10/Imagenette archives plus small synthetic layouts."""

import collections
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leanvit import data as D
from leanvit.data import cifar, readers
from leanvit.data import (
    CIFAR10_CLASSES,
    EMBEDDED_CIFAR10,
    Batch,
    DataError,
    eval_transform,
    find_default_cifar10,
    load_dataset,
    make_loader,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
IMAGENETTE_TAR = SHARED / "imagenette-val-224.tar"
IMAGENETTE_INDICES = {0, 217, 482, 491, 497, 566, 569, 571, 574, 701}

CFG32 = dict(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261),
             crop_pct=1.0, interpolation="bicubic")

needs_imagenette = pytest.mark.skipif(not IMAGENETTE_TAR.is_file(), reason=f"{IMAGENETTE_TAR} not present")


# ----------------------------------------------------------------- real archives


@pytest.fixture(scope="module")
def cifar_test():
    return load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(CFG32), num_classes=10)


def test_embedded_cifar_sample_is_what_its_readme_says(cifar_test):
    import hashlib
    readme = (EMBEDDED_CIFAR10.parent / "README.md").read_text()
    digest = hashlib.sha256(EMBEDDED_CIFAR10.read_bytes()).hexdigest()
    assert f"sha256 `{digest}`" in readme and f"({EMBEDDED_CIFAR10.stat().st_size:,} bytes)" in readme
    assert EMBEDDED_CIFAR10.stat().st_size <= 3 * 2**20
    ds = cifar_test
    assert len(ds) == 2000
    assert tuple(ds.classes) == CIFAR10_CLASSES
    assert collections.Counter(ds.targets) == {i: 200 for i in range(10)}
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == 0 and ds.path(0).endswith("test/airplane/0002.jpg")
    # the last item is a truck, label 9
    assert ds[-1][1] == 9 and "test/truck/" in ds.path(len(ds) - 1)
    # the demo's default subset of it is all of it (so demo numbers match the full archive's)
    assert load_dataset(EMBEDDED_CIFAR10, split="test", limit=2000).paths == ds.paths


def test_cifar_val_split_aliases_test_folder():
    ds = load_dataset(EMBEDDED_CIFAR10, split="val", limit=100)
    assert len(ds) == 100
    assert collections.Counter(ds.targets) == {i: 10 for i in range(10)}  # exactly balanced
    assert all(":test/" in ds.path(i) for i in range(len(ds)))
    img, _ = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    with pytest.raises(DataError, match=r"splits \['test'\].*'train'"):
        load_dataset(EMBEDDED_CIFAR10, split="train")  # the sample is for evaluation only


def test_cifar_loader_batches(cifar_test):
    sub = torch.utils.data.Subset(cifar_test, range(0, 2000, 100))  # 20 images, 2 per class
    batches = list(make_loader(sub, batch_size=8, num_workers=0))
    assert [len(b) for b in batches] == [8, 8, 4]
    assert all(isinstance(b, Batch) and b.skipped == [] for b in batches)
    labels = torch.cat([b.labels for b in batches])
    assert labels.dtype == torch.long and labels.tolist() == [i // 2 for i in range(20)]
    # normalised with the CIFAR mean/std: roughly zero-centred
    assert abs(torch.cat([b.images for b in batches]).mean().item()) < 0.5


def test_data_names_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset("cifar10-sample", split="test", limit=10)) == 10
    assert D.resolve_data("cifar10-sample") == EMBEDDED_CIFAR10
    # a folder of that name is the user's data, not the name
    (tmp_path / "cifar10-sample" / "cls").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "cifar10-sample" / "cls" / "a.png")
    assert load_dataset("cifar10-sample").classes == ["cls"]


def test_download_offline_fails_fast_and_names_data(tmp_path, monkeypatch):
    import socket
    import time

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    with pytest.raises(DataError, match=r"seems offline: pass --data PATH.*cifar10-sample") as e:
        load_dataset("cifar10", split="test")
    assert time.time() - t0 < 5 and "cs.toronto.edu" in str(e.value)
    assert not (tmp_path / "home" / ".cache" / "leanvit" / "cifar-10-batches-py").exists()


def test_download_checks_every_file(tmp_path, monkeypatch):
    """A download whose files do not match torchvision's md5 list is an error, not data; with
    the right files in place nothing is fetched (the network is never asked)."""
    import socket

    import torchvision.datasets.utils as tvu
    from torchvision.datasets import CIFAR10

    class Connection:
        def close(self):
            pass

    def fake_download(url, root, filename=None, md5=None, remove_finished=False):
        d = Path(root) / CIFAR10.base_folder
        d.mkdir(parents=True, exist_ok=True)
        for name, _ in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], ""]]:
            (d / name).write_bytes(b"not cifar")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    with pytest.raises(DataError, match="failed its md5 check after the download"):
        D.download_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "_md5", lambda path: dict(CIFAR10.train_list + CIFAR10.test_list)
                        .get(path.name, CIFAR10.meta["md5"]))
    monkeypatch.setattr(socket, "create_connection", None)  # would raise if called
    assert D.download_cifar10(tmp_path) == tmp_path / "cifar-10-batches-py"


def test_download_really_offline_here_is_quick(tmp_path):
    """Without monkeypatching: on an offline machine (CI) the error comes within seconds; online,
    only the connection is tried (nothing is downloaded into the test's folder: it is checked)."""
    import socket
    import time
    try:
        socket.create_connection(("www.cs.toronto.edu", 443), timeout=3).close()
        pytest.skip("this machine is online")  # not counted: CI and the fresh-clone check are offline
    except OSError:
        pass
    t0 = time.time()
    with pytest.raises(DataError, match="--data"):
        D.download_cifar10(tmp_path, timeout=3)
    assert time.time() - t0 < 10


@needs_imagenette
def test_imagenette_for_1000_class_model():
    ds = load_dataset(IMAGENETTE_TAR, num_classes=1000)
    assert len(ds) == 3925
    assert set(ds.targets) == IMAGENETTE_INDICES
    label_of = {p.rsplit(":", 1)[1].split("/")[1]: t for p, t in zip(ds.paths, ds.targets)}
    assert len(label_of) == 10
    assert label_of["n01440764"] == 0 and label_of["n02102040"] == 217 and label_of["n03888257"] == 701
    # grayscale photos come out as RGB 224x224
    img, _ = ds[0]
    assert img.mode == "RGB" and img.size == (224, 224)


@needs_imagenette
def test_imagenette_num_classes_10_and_mismatch():
    ds = load_dataset(IMAGENETTE_TAR, num_classes=10, limit=30)
    assert sorted(set(ds.targets)) == list(range(10)) and len(ds) == 30
    # the subset is deterministic in seed and differs across seeds
    assert load_dataset(IMAGENETTE_TAR, limit=30).paths == ds.paths
    assert load_dataset(IMAGENETTE_TAR, limit=30, seed=1).paths != ds.paths
    with pytest.raises(DataError, match=r"has 10 classes .* num_classes=5"):
        load_dataset(IMAGENETTE_TAR, num_classes=5, limit=30)
    with pytest.raises(DataError, match=r"splits \['val'\].*'train'"):
        load_dataset(IMAGENETTE_TAR, split="train")


def test_wnid_tar_grayscale_through_transform(tmp_path):
    """ImageNet-style archive (val/<wnid>/*.JPEG, grayscale among them), as Imagenette's."""
    import tarfile
    path = tmp_path / "nette.tar"
    with tarfile.open(path, "w") as tar:
        for i, (wnid, mode) in enumerate([("n01440764", "L"), ("n01440764", "RGB"), ("n03888257", "L")]):
            buf = io.BytesIO()
            Image.new(mode, (224, 224), 90).save(buf, "JPEG")
            info = tarfile.TarInfo(f"val/{wnid}/img{i}.JPEG")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    ds = load_dataset(path, limit=40, transform=eval_transform(CFG32), num_classes=1000)
    assert ds.targets == [0, 0, 701]
    xs = [ds[i][0] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) for x in xs)


def test_find_default_cifar10_finds_shared_archive(tmp_path, monkeypatch):
    """../shared/data/cifar10-jpeg.tar.gz next to the working directory is found."""
    shared = tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delenv("LEANVIT_DATA", raising=False)
    assert Path(find_default_cifar10()).resolve() == shared.resolve()


# ----------------------------------------------------------------- ImageFolder + bad images

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ split dirs; val has 3 classes x 2 PNGs, a grey PNG, and two bad files."""
    root = tmp_path / "imgs"
    good = []
    for split in ("train", "val"):
        for cls, rgb in COLOURS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(2):
                p = d / f"{k}.png"
                Image.new("RGB", (8, 8), rgb).save(p)
                if split == "val":
                    good.append(p)
    grey = root / "val" / "dog" / "grey.png"
    Image.new("L", (8, 8), 77).save(grey)
    good.append(grey)
    corrupt = root / "val" / "cat" / "x.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = root / "val" / "emu" / "trunc.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "val" / "emu" / "notes.txt").write_text("not an image")
    return root, good, [corrupt, truncated]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_loader_skips_bad_images(folder, num_workers):
    root, good, bad = folder
    ds = load_dataset(root, split="val")
    assert ds.classes == ["cat", "dog", "emu"]
    assert len(ds) == len(good) + len(bad)  # .txt ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(make_loader(ds, batch_size=3, num_workers=num_workers))
    skipped = sorted(p for b in batches for p in b.skipped)
    assert skipped == sorted(map(str, bad))
    images = torch.cat([b.images for b in batches if len(b)])
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert images.shape == (len(good), 3, 8, 8) and images.dtype == torch.uint8  # no transform
    assert sorted(labels) == [0, 0, 1, 1, 1, 2, 2]
    # pixel colours survive, the grey PNG became 3 equal channels
    colours = {tuple(img[:, 0, 0].tolist()) for img in images}
    assert colours == set(COLOURS.values()) | {(77, 77, 77)}


def test_bad_image_item_and_warning(folder):
    root, _, bad = folder
    ds = load_dataset(root)  # split 'val' by default
    i = ds.paths.index(str(bad[1]))
    readers._warned.discard(str(bad[1]))
    with pytest.warns(UserWarning, match="skipping unreadable image .*trunc.jpg"):
        assert ds[i] == (None, str(bad[1]))
    # a whole batch of bad images: empty images, both paths reported
    b = D.collate([(None, "a"), (None, "b")])
    assert len(b) == 0 and b.images.shape[0] == 0 and b.labels.shape == (0,) and b.skipped == ["a", "b"]


def test_folder_transform_and_split_choice(folder):
    root, _, _ = folder
    train = load_dataset(root, split="train", transform=eval_transform(dict(CFG32, input_size=(3, 16, 16))))
    assert len(train) == 6 and train.split == "train"
    x, y = train[0]
    assert x.shape == (3, 16, 16)
    # 'test' is served by the val/ folder when there is no test/
    assert load_dataset(root, split="test").split == "val"
    # the class folder itself is also an ImageFolder root
    flat = load_dataset(root / "train")
    assert flat.classes == ["cat", "dog", "emu"] and len(flat) == 6


def test_folder_limit_is_class_balanced(tmp_path):
    for c in range(4):
        d = tmp_path / f"c{c}"
        d.mkdir()
        for k in range(25 if c == 0 else 5):  # one big class must not crowd out the rest
            Image.new("RGB", (4, 4)).save(d / f"{k}.png")
    ds = load_dataset(tmp_path, limit=8)
    assert collections.Counter(ds.targets) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_tar_of_class_folders(tmp_path):
    import tarfile
    src = tmp_path / "src"
    for cls in ("b", "a"):
        (src / "wrap" / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (5, 5), (k, 0, 0)).save(src / "wrap" / cls / f"{k}.png")
    tgz = tmp_path / "set.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "wrap", arcname="./wrap")  # wrapper dir, "./" prefix, no split level
    ds = load_dataset(tgz, num_classes=2)
    assert ds.classes == ["a", "b"] and ds.targets == [0, 0, 0, 1, 1, 1]
    assert ds[4][0].getpixel((0, 0)) == (1, 0, 0)


# ----------------------------------------------------------------- torchvision CIFAR-10 pickles


@pytest.fixture
def cifar_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("data_batch_1", 7), ("data_batch_2", 5), ("test_batch", 6)):
        arr = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": arr, b"labels": labels,
                         b"filenames": [b"x.png"] * n}, f)
        out[name] = (arr, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f)
    return d, out


def test_cifar_batches_round_trip(cifar_batches):
    d, out = cifar_batches
    test = load_dataset(d.parent, split="val")  # the parent dir works too
    arr, labels = out["test_batch"]
    assert len(test) == 6 and test.targets == labels and tuple(test.classes) == CIFAR10_CLASSES
    for i in range(6):
        img, y = test[i]
        assert img.size == (32, 32) and y == labels[i]
        np.testing.assert_array_equal(np.asarray(img), arr[i].reshape(3, 32, 32).transpose(1, 2, 0))
    train = load_dataset(d, split="train")
    assert len(train) == 12 and train.targets == out["data_batch_1"][1] + out["data_batch_2"][1]
    np.testing.assert_array_equal(np.asarray(train[7][0]),
                                  out["data_batch_2"][0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    b = next(iter(make_loader(train, batch_size=12, num_workers=0)))
    assert b.images.shape == (12, 3, 32, 32) and b.labels.tolist() == train.targets


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_any_pickle_protocol(tmp_path, protocol):
    """Python 3 pickles of every protocol numpy writes (bytes via _codecs.encode at protocol 2,
    arrays via _reconstruct or _frombuffer) pass the restricted unpickler."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    arr = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": arr, b"labels": [3, 4], b"batch_label": b"t"}, protocol))
    ds = load_dataset(d, split="test")
    assert ds.targets == [3, 4]
    np.testing.assert_array_equal(np.asarray(ds[1][0]), arr[1].reshape(3, 32, 32).transpose(1, 2, 0))


class _Payload:
    """Unpickling this runs ``touch <marker>`` (if the reader lets it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["test_batch", "data_batch_1", "batches.meta"])
def test_crafted_cifar_pickle_stays_inert(tmp_path, name):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    marker = tmp_path / "pwned"
    arr = np.zeros((2, 3072), dtype=np.uint8)
    good = {b"data": arr, b"labels": [0, 1]}
    for f in ("test_batch", "data_batch_1", "batches.meta"):
        payload = {b"label_names": [_Payload(marker)]} if f == "batches.meta" else dict(good, x=_Payload(marker))
        (d / f).write_bytes(pickle.dumps(payload if f == name else ({b"label_names": [b"a", b"b"]}
                                                                      if f == "batches.meta" else good)))
    split = "train" if name == "data_batch_1" else "test"
    if name == "batches.meta":  # class names are optional: warned about, then CIFAR-10's are used
        assert load_dataset(d, split=split).classes == list(CIFAR10_CLASSES)
    else:
        with pytest.raises(DataError, match=r"not a CIFAR-10 batch.*refused to load posix.system|"
                                            r"not a CIFAR-10 batch.*refused to load os.system"):
            load_dataset(d, split=split)
    assert not marker.exists()


# ----------------------------------------------------------------- errors and defaults


def test_errors_are_helpful(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset(missing)
    assert str(missing) in str(e.value) and "ImageFolder" in str(e.value)

    text = tmp_path / "labels.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="not a tar archive") as e:
        load_dataset(text)
    assert str(text) in str(e.value) and "cifar-10-batches-py" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found") as e:
        load_dataset(empty)
    assert str(empty) in str(e.value) and "<class>/<img>" in str(e.value)

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (4, 4)).save(loose / "a.png")
    with pytest.raises(DataError, match="one folder per class"):
        load_dataset(loose)

    (loose / "cls").mkdir()
    Image.new("RGB", (4, 4)).save(loose / "cls" / "b.png")
    with pytest.raises(DataError, match="limit must be a positive"):
        load_dataset(loose, limit=0)


def test_default_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cifar, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv("LEANVIT_DATA", raising=False)
    assert find_default_cifar10() is None
    with pytest.raises(DataError, match="no CIFAR-10 found; looked in") as e:
        load_dataset(None)
    msg = str(e.value)
    assert "LEANVIT_DATA" in msg and "cifar-10-batches-py" in msg and "--data PATH" in msg
    # torchvision location under ./data is found
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    assert find_default_cifar10() == str(tmp_path / "data" / "cifar-10-batches-py")
    # $LEANVIT_DATA wins, and a directory holding the archive resolves to the archive
    env = tmp_path / "mine"
    env.mkdir()
    (env / "cifar10-jpeg.tar.gz").write_bytes(b"")
    monkeypatch.setenv("LEANVIT_DATA", str(env))
    assert find_default_cifar10() == str(env / "cifar10-jpeg.tar.gz")


# ----------------------------------------------------------------- model-derived transform


def test_eval_transform_from_timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    tf = eval_transform(model)
    rgb = (128, 64, 200)
    x = tf(Image.new("RGB", (300, 200), rgb))
    assert x.shape == (3, 224, 224)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=2e-2, rtol=0)
    # grayscale input is converted to RGB first
    assert tf(Image.new("L", (50, 80), 10)).shape == (3, 224, 224)


def test_eval_transform_through_wrapper_and_fallback():
    timm = pytest.importorskip("timm")
    inner = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    inner.pretrained_cfg = dict(inner.pretrained_cfg, input_size=(3, 160, 160))

    class Wrapper(torch.nn.Module):  # e.g. leanvit's LeanViT keeps the timm model in .model
        def __init__(self, model):
            super().__init__()
            self.model = model

    assert eval_transform(Wrapper(inner))(Image.new("RGB", (40, 30))).shape == (3, 160, 160)
    with pytest.warns(UserWarning, match="no timm pretrained_cfg"):
        tf = eval_transform(torch.nn.Linear(2, 2))
    assert tf(Image.new("RGB", (40, 30))).shape == (3, 224, 224)
