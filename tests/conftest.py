import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).parent / "programs"
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg"


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


@pytest.fixture(scope="session")
def shared_cifar():
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip("the shared CIFAR-10 copy is not beside this checkout")
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory, shared_cifar):
    """A 10-class ImageFolder tree made of real CIFAR-10 images: 30 train and 10 test per class."""
    import shutil

    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 30), ("test", 10)):
        for cls in sorted(p.name for p in (shared_cifar / split).iterdir()):
            (root / split / cls).mkdir(parents=True)
            for image in sorted((shared_cifar / split / cls).iterdir())[:count]:
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
