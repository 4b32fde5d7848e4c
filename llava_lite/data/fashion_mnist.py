"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: 60k train / 10k test 28x28
grayscale images in 10 classes, fetched once with `apt-get download` (no root needed) and
unpacked into the llava-lite cache."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
PACKAGE = "dataset-fashion-mnist"
MEMBER_DIR = "usr/share/datasets/fashion-mnist/"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetUnavailable(RuntimeError):
    pass


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Debian package (an `ar` archive)."""
    if not data.startswith(b"!<arch>\n"):
        raise DatasetUnavailable("not a Debian package (ar archive)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def _extract_deb(deb: Path, out: Path) -> None:
    members = _ar_members(deb.read_bytes())
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise DatasetUnavailable(f"{deb}: no data.tar member")
    payload = members[name]
    if name.endswith(".xz"):
        payload = lzma.decompress(payload)
    elif name.endswith(".gz"):
        payload = gzip.decompress(payload)
    elif not name.endswith(".tar"):
        raise DatasetUnavailable(f"{deb}: unsupported compression {name}")
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        for member in tar.getmembers():
            path = member.name.lstrip("./")
            if member.isfile() and path.startswith(MEMBER_DIR) and path.endswith(".gz"):
                target = out / Path(path).name
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def dataset_dir(root: Path) -> Path:
    """The folder with the four .gz files, downloading the Debian package the first time."""
    out = root / "fashion-mnist"
    if all((out / f).is_file() for pair in FILES.values() for f in pair):
        return out
    if shutil.which("apt-get") is None:
        raise DatasetUnavailable(f"apt-get not found: download the Debian package {PACKAGE} and put its "
                                 f"{MEMBER_DIR}*.gz files in {out}")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise DatasetUnavailable(f"`apt-get download {PACKAGE}` failed: {proc.stderr.strip()[-300:]}")
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".fashion-mnist-"))
        try:
            _extract_deb(debs[0], staging)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) for "train" or "test"."""
    if split not in FILES:
        raise ValueError(f"fashion-mnist split {split!r}; use train or test")
    folder = dataset_dir(root)
    images, labels = (_read_idx(folder / f) for f in FILES[split])
    return images, labels.astype(np.int64)
