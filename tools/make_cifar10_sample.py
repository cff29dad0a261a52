"""Build leanvit's embedded CIFAR-10 sample: src/leanvit/assets/cifar10-test-2000.tar.gz.

The sample is the class-balanced 2,000-image subset of the CIFAR-10 (JPEG) test split that
`leanvit demo` has always evaluated (``load_dataset(..., split="test", limit=2000, seed=0)``):
the same JPEG files, byte for byte, so demo numbers on the sample equal those on the full
archive with ``--limit 2000``. The archive is deterministic (sorted members, zero mtimes,
no owner names), so re-running this script reproduces its sha256.

    python tools/make_cifar10_sample.py ../shared/data/cifar10-jpeg.tar.gz
"""
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

from leanvit.data import EMBEDDED_CIFAR10, load_dataset


def main(source: str, out: Path = EMBEDDED_CIFAR10) -> None:
    ds = load_dataset(source, split="test", limit=2000, seed=0)
    members = sorted((p.rsplit(":", 1)[1], blob) for p, blob in zip(ds.paths, ds._blobs))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            tar.addfile(info, io.BytesIO(blob))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {len(members)} images, {out.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpeg.tar.gz")
