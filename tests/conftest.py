import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).parent / "programs"
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Every test writes decoded datasets to a private cache, never to ~/.cache or the data folder."""
    os.environ["EDGENAS_CACHE"] = str(tmp_path_factory.mktemp("edgenas-cache"))


def program(name: str) -> str:
    return (PROGRAMS / name).read_text()


def run_cli(*args, env=None, timeout=600, cwd=None):
    import subprocess

    return subprocess.run([sys.executable, "-m", "edgenas.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)


def write_image_folder(root: Path, splits: dict[str, int], size: tuple[int, int] = (32, 32),
                       classes: list[str] | None = None) -> Path:
    """A learnable stand-in for a real image set, as PNG files in <root>/<split>/<class>/: each class has its own
    colour and stripe direction, under noise and a random phase. Tests use it where ../shared holds no real images
    (a user's clone, CI elsewhere), so nothing that needs image files is skipped there."""
    from PIL import Image

    classes = classes or CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    colours = rng.uniform(40, 215, (len(classes), 3))
    for split, per_class in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            angle, colour = np.pi * c / len(classes), colours[c]
            for i in range(per_class):
                stripes = np.sin(12 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
                pixels = colour + 40 * stripes[..., None] + rng.normal(0, 25, (h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """CIFAR-10 as class folders: the real images beside the checkout when ../shared has them, else a generated
    stand-in of the same shape (7,000 train and 1,000 test images)."""
    if (SHARED_CIFAR / "train").is_dir():
        return SHARED_CIFAR
    return write_image_folder(tmp_path_factory.mktemp("cifar-like"), {"train": 700, "test": 100})


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory, cifar_folder):
    """A 10-class ImageFolder tree: 30 train and 10 test images per class."""
    import shutil

    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 30), ("test", 10)):
        for cls in sorted(p.name for p in (cifar_folder / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for image in sorted((cifar_folder / split / cls).iterdir())[:count]:
                shutil.copy(image, root / split / cls / image.name)
    return root


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """Small files in torchvision's cifar-100-python format (the real set cannot be downloaded here)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n)),
                "coarse_labels": list(rng.integers(0, 20, n))}
        (folder / name).write_bytes(pickle.dumps(data))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return root


@pytest.fixture(scope="session")
def device_python(tmp_path_factory):
    """A fresh virtual environment with only what the README's device instructions install (onnxruntime and
    numpy, no torch): where the device agent runs in the tests, as on a target."""
    import subprocess

    env = tmp_path_factory.mktemp("device-env")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", "onnxruntime", "numpy"], check=True, timeout=600)
    python = str(env / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0  # really without
    return python


@pytest.fixture()
def listener():
    """A TCP server on loopback that records connections: (port, hits). Sandbox tests assert none arrive."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    hits, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                hits.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join()
    server.close()
