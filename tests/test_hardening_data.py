"""Every entry of a data set is classified before it is opened: regular image files are read as a
person sees them (16-bit, palette, CMYK, alpha), anything else (FIFO, socket, device, a link leaving
the data folder or into another class) is skipped and counted, never opened in a way that blocks.
Tar hard links are read; labels are checked for range both ways."""
import io
import os
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from leanvit.data import DataError, load_dataset

from test_hardening import _image_folder


def _load_all(root, **kw):
    """The data set and every image of it decoded, in a thread: a test that would hang fails instead."""
    out = {}

    def run():
        try:
            ds = load_dataset(root, **kw)
            out["images"] = [ds[i] for i in range(len(ds))]
            out["ds"] = ds
        except Exception as e:
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    return t, out


def _unblock(fifo):
    try:  # a reader blocked on the FIFO returns once a writer opens and closes it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path):
    root = _image_folder(tmp_path / "data")
    fifo = root / "cat" / "x.jpg"
    os.mkfifo(fifo)
    t, out = _load_all(root)
    if t.is_alive():
        _unblock(fifo)
        t.join(timeout=10)
        pytest.fail("reading a folder with a FIFO blocked")
    assert "error" not in out, out.get("error")
    ds = out["ds"]
    assert len(ds) == 6 and str(fifo) not in ds.paths
    assert any(s.startswith(str(fifo)) and "FIFO" in s for s in ds.skipped_files)


def test_sockets_and_devices_are_skipped(tmp_path):
    root = _image_folder(tmp_path / "data")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "dog" / "s.png"))
    (root / "dog" / "null.png").symlink_to("/dev/null")  # a link to a device
    try:
        t, out = _load_all(root)
    finally:
        sock.close()
    assert not t.is_alive() and "error" not in out, out.get("error")
    ds = out["ds"]
    assert len(ds) == 6 and len(ds.skipped_files) == 2
    assert any("socket" in s for s in ds.skipped_files) and any("device" in s for s in ds.skipped_files)


def test_links_into_another_class_or_out_of_the_data_are_skipped(tmp_path, caplog):
    root = _image_folder(tmp_path / "data")
    (root / "cat" / "dogs").symlink_to(root / "dog")  # a folder of the other class
    (root / "cat" / "a_dog.png").symlink_to(root / "dog" / "0.png")  # one image of the other class
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (32, 32)).save(outside / "o.png")
    (root / "dog" / "out.png").symlink_to(outside / "o.png")
    (root / "dog" / "away").symlink_to(outside)
    (root / "cat" / "same.png").symlink_to(root / "cat" / "0.png")  # within its own class: read
    ds = load_dataset(root)
    labels = {os.path.relpath(p, root): ds.targets[i] for i, p in enumerate(ds.paths)}
    assert sorted(labels) == sorted([f"cat/{i}.png" for i in range(3)] + ["cat/same.png"]
                                    + [f"dog/{i}.png" for i in range(3)])
    assert all(v == (0 if k.startswith("cat") else 1) for k, v in labels.items())  # the dog images keep their label
    skipped = ds.skipped_files + ds.skipped_folders
    assert any(s.startswith(str(root / "cat" / "dogs")) and "into the class dog" in s for s in skipped)
    assert any(s.startswith(str(root / "cat" / "a_dog.png")) and "into the class dog" in s for s in skipped)
    assert any(s.startswith(str(root / "dog" / "out.png")) and "leaves the data folder" in s for s in skipped)
    assert any(s.startswith(str(root / "dog" / "away")) and "leaves the data folder" in s for s in skipped)
    assert not any("loop" in s for s in skipped)


def _pixels(path):
    ds = load_dataset(path.parent.parent)
    i = ds.paths.index(str(path))
    img, _ = ds[i]
    return np.asarray(img)


def test_image_modes_are_read_as_a_person_sees_them(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    gray16 = np.full((8, 8), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    Image.fromarray(gray16).save(root / "a" / "g16.png")
    assert Image.open(root / "a" / "g16.png").mode.startswith("I")
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(root / "a" / "pal.png")
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    cmyk.save(root / "a" / "red.jpg", quality=100)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent: a person sees the background
    clear.putpixel((0, 0), (0, 0, 255, 255))
    clear.save(root / "b" / "clear.png")
    la = Image.new("LA", (8, 8), (0, 0))
    la.save(root / "b" / "la.png")
    g = _pixels(root / "a" / "g16.png")
    assert abs(int(g[0, 0, 0]) - 128) <= 1 and (g[..., 0] == g[..., 1]).all()
    p = _pixels(root / "a" / "pal.png")
    assert tuple(p[0, 0]) == (255, 0, 0) and tuple(p[1, 1]) == (0, 0, 0)
    r = _pixels(root / "a" / "red.jpg")
    assert r[4, 4, 0] > 200 and r[4, 4, 1] < 50 and r[4, 4, 2] < 50
    c = _pixels(root / "b" / "clear.png")
    assert tuple(c[0, 0]) == (0, 0, 255) and tuple(c[4, 4]) == (255, 255, 255)
    assert tuple(_pixels(root / "b" / "la.png")[4, 4]) == (255, 255, 255)


def _tar_with_hard_link(path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    blob = buf.getvalue()
    with tarfile.open(path, "w") as tf:
        for name in ("cat/0.png", "dog/0.png"):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("cat/1.png")
        link.type, link.linkname = tarfile.LNKTYPE, "cat/0.png"
        tf.addfile(link)
        sym = tarfile.TarInfo("dog/1.png")
        sym.type, sym.linkname = tarfile.SYMTYPE, "../cat/0.png"
        tf.addfile(sym)
        fifo = tarfile.TarInfo("dog/2.png")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)


def test_tar_hard_links_are_read_and_other_members_counted(tmp_path):
    path = tmp_path / "d.tar"
    _tar_with_hard_link(path)
    ds = load_dataset(path)
    names = sorted(p.split(":", 1)[1] for p in ds.paths)
    assert names == ["cat/0.png", "cat/1.png", "dog/0.png"]
    img, label = ds[ds.paths.index(f"{path}:cat/1.png")]
    assert label == 0 and tuple(np.asarray(img)[0, 0]) == (10, 20, 30)
    assert sorted(s.split(" ")[0] for s in ds.skipped_files) == [f"{path}:dog/1.png", f"{path}:dog/2.png"]


@pytest.mark.parametrize("label", [-1, 10, 255])
def test_cifar_labels_out_of_range_either_way(label, tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data = np.zeros((4, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [0, 1, label, 2]}, f)
    with pytest.raises(DataError, match=f"label {label} out of range for 10 classes"):
        load_dataset(d, split="test")


def test_train_counts_skipped_images_in_its_metrics(tmp_path, capsys):
    import json
    from leanvit.cli import main
    root = tmp_path / "data"
    names = [f"c{i}" for i in range(10)]
    _image_folder(root / "train", classes=names, per_class=2)
    _image_folder(root / "test", classes=names, per_class=1)
    (root / "train" / "c0" / "broken.png").write_bytes(b"not a png")
    (root / "test" / "c1" / "broken.png").write_bytes(b"\x89PNG nor this")
    out = tmp_path / "run"
    assert main(["train", "--model", "vit12_convstem_w96_cifar", "--data", str(root), "--out", str(out),
                 "--batch-size", "7", "--epochs", "1", "--workers", "0", "--eval-split", "test"]) == 0, \
        capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"]["train"] == 1 and metrics["skipped_images"]["eval"] == 1
    assert sorted(metrics["skipped_images"]["paths"]) == sorted([str(root / "train" / "c0" / "broken.png"),
                                                                  str(root / "test" / "c1" / "broken.png")])
