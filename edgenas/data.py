"""Datasets as cached uint8 tensors, a held-out validation split, and batched tensor augmentation.

Images are decoded once into one uint8 tensor per split and cached on disk (never inside the data
folder). Training reads whole batches from that tensor, already on the training device, and does
the crop, flip and normalisation on the batch: no per-image PIL work, no DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from edgenas.config import AugmentConfig, DatasetConfig

CACHE_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(RuntimeError):
    """The data cannot be read as configured; the message is one line that says what to do."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Data:
    """The splits a process asked for; the others are None (the jail holds training images only)."""

    name: str
    classes: list[str]
    train: Split | None
    val: Split | None
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def cache_root(cfg: DatasetConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("EDGENAS_CACHE") or Path.home() / ".cache" / "edgenas")


def data_root(cfg: DatasetConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else cache_root(cfg) / "data" / cfg.name


# ---------------------------------------------------------------- sources: each returns full train and test


def _cifar(cfg: DatasetConfig):
    import torchvision

    base = torchvision.datasets.CIFAR100 if cfg.name == "cifar100" else torchvision.datasets.CIFAR10
    root = data_root(cfg)

    class Present(base):
        """Trust files that are present (their pickles fail loudly if damaged); MD5 is for downloads."""

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]

    folder = root / base.base_folder
    names = [name for name, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    present = all((folder / name).is_file() for name in names)
    cls = Present if present else base
    try:
        parts = [cls(str(root), train=t, download=cfg.download and cls is base) for t in (True, False)]
    except Exception as e:
        if present:  # the files are there but do not read: say which error, not "could not be downloaded"
            raise DataError(f"{cfg.name}: the files under {folder} are damaged or not CIFAR "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); replace them") from None
        # missing: torchvision raises RuntimeError or urllib errors offline
        why = f"the download failed: {type(e).__name__}" if cfg.download else "dataset.download is false"
        target = shlex.quote(str(root))
        raise DataError(
            f"{cfg.name}: no '{base.base_folder}' under {root} ({why}); to place a local copy, fetch {base.url} "
            f"where the network allows, then run: mkdir -p {target} && tar -xzf {base.filename} -C {target} "
            f"(or point dataset.root at a folder that holds '{base.base_folder}')"
        ) from None
    train, test = (
        Split(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets)) for p in parts
    )
    return train, test, list(parts[0].classes)


def _list_folder(split_dir: Path, classes: list[str]):
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    return files, labels


def _decode(path: Path, size: int | None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    if size and tuple(image.shape[1:]) != (size, size):
        resized = torch.nn.functional.interpolate(
            image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    return image


def _decode_all(files: list[Path], size: int | None) -> torch.Tensor:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        images = list(pool.map(lambda p: _decode(p, size), files, chunksize=256))
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise DataError(f"images differ in size ({sorted(shapes)[:3]}...); set dataset.image_size to resize them")
    return torch.stack(images)


def _folder_splits(cfg: DatasetConfig) -> tuple[Path, Path | None]:
    root = data_root(cfg)
    train_dir = root / cfg.train_split
    if not train_dir.is_dir():
        raise DataError(f"{cfg.name}: no '{cfg.train_split}' folder under {root} (expected {root}/<split>/<class>/<image>)")
    names = [cfg.test_split] if cfg.test_split else ["test", "val"]
    test_dir = next((root / n for n in names if (root / n).is_dir()), None)
    return train_dir, test_dir


def _folder_listing(cfg: DatasetConfig):
    train_dir, test_dir = _folder_splits(cfg)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{cfg.name}: {train_dir} has no class folders")
    train = _list_folder(train_dir, classes)
    test = _list_folder(test_dir, classes) if test_dir else ([], [])
    if not train[0]:
        raise DataError(f"{cfg.name}: no images under {train_dir}")
    return classes, train, test


def _folder(cfg: DatasetConfig):
    classes, (train_files, train_labels), (test_files, test_labels) = _folder_listing(cfg)
    size = cfg.image_size or (160 if cfg.name == "imagenette" else None)
    train = Split(_decode_all(train_files, size), torch.tensor(train_labels))
    test = Split(_decode_all(test_files, size), torch.tensor(test_labels)) if test_files else None
    return train, test, classes


def _synthetic(cfg: DatasetConfig):
    """Learnable random data: each class is a smooth random pattern (seeded by the config) plus noise drawn from
    a seed nobody keeps. The images exist only in the cache: a candidate that knows the config and this code
    cannot regenerate the held-out ones (and their labels) to look them up."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    c, h, w = cfg.in_shape
    patterns = torch.randn(cfg.num_classes, c, 4, 4, generator=g)

    def make(n):
        labels = torch.randperm(n, generator=noise) % cfg.num_classes
        smooth = torch.nn.functional.interpolate(patterns[labels], size=(h, w), mode="bilinear")
        images = 128 + 50 * smooth + 40 * torch.randn(n, c, h, w, generator=noise)
        return Split(images.clamp(0, 255).to(torch.uint8), labels)

    return make(cfg.synthetic_size), make(max(2, cfg.synthetic_size // 4)), [f"class{i}" for i in range(cfg.num_classes)]


SOURCES = {"cifar10": _cifar, "cifar100": _cifar, "imagenette": _folder, "folder": _folder, "synthetic": _synthetic}


# ---------------------------------------------------------------- cache


def _cache_key(cfg: DatasetConfig) -> str:
    ident = {"v": CACHE_VERSION, "name": cfg.name}
    if cfg.name == "synthetic":
        ident.update(shape=cfg.in_shape, classes=cfg.num_classes, size=cfg.synthetic_size, seed=cfg.split_seed)
    else:
        root = data_root(cfg)
        ident.update(root=str(root.resolve()), size=cfg.image_size)
        if cfg.name in ("folder", "imagenette"):
            _, train, test = _folder_listing(cfg)
            listing = [str(p.relative_to(root)) for p in train[0] + test[0]]
            ident.update(files=hashlib.sha256("\n".join(listing).encode()).hexdigest())
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_raw(cfg: DatasetConfig) -> dict:
    path = cache_root(cfg) / "datasets" / f"{cfg.name}-{_cache_key(cfg)}.pt"
    if path.is_file():
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)  # a damaged cache is rebuilt, not trusted
    raw = _to_raw(*SOURCES[cfg.name](cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(raw, tmp)
    os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache
    return raw


def _to_raw(train: Split, test: Split | None, classes: list[str]) -> dict:
    pixels = train.images.float().div_(255).transpose(0, 1).flatten(1)
    return {
        "train_images": train.images, "train_labels": train.labels,
        "test_images": test.images if test else None, "test_labels": test.labels if test else None,
        "classes": classes, "mean": pixels.mean(1).tolist(), "std": pixels.std(1).tolist(),
    }


def load_data(cfg: DatasetConfig, parts: tuple[str, ...] = ("train", "val")) -> Data:
    """The requested splits: "train" (minus the held-out validation split, then `train_subset`), "val" (seeded,
    held out from train; the proxy is scored on it) and "test". Each is a copy: nothing else of the cache stays
    referenced, so a process forked later holds exactly these."""
    raw = _load_raw(cfg)
    images, labels = raw["train_images"], raw["train_labels"]
    if cfg.val_size >= len(labels):
        raise DataError(f"dataset.val_size={cfg.val_size} leaves no training images (the train split has {len(labels)})")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_subset:
        train_idx = train_idx[: cfg.train_subset]
    if "test" in parts and raw["test_images"] is None:
        raise DataError(f"{cfg.name}: this dataset has no test split")
    pick = {"train": train_idx, "val": val_idx}
    splits = {part: Split(images[pick[part]], labels[pick[part]]) for part in ("train", "val") if part in parts}
    if "test" in parts:
        splits["test"] = Split(raw["test_images"].clone(), raw["test_labels"].clone())
    return Data(name=cfg.name, classes=list(raw["classes"]), train=splits.get("train"), val=splits.get("val"),
                test=splits.get("test"), mean=tuple(raw["mean"]), std=tuple(raw["std"]),
                in_shape=tuple(images.shape[1:]))


# ---------------------------------------------------------------- batches


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch, in one gather."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device="cpu", generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device="cpu", generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class Normalize:
    """uint8 batch -> float batch, (x/255 - mean)/std folded into one multiply-add."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        std_t = torch.tensor(std, device=device)
        self.scale = (1 / (255 * std_t))[None, :, None, None]
        self.shift = (-torch.tensor(mean, device=device) / std_t)[None, :, None, None]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(self.shift, images.float(), self.scale)
        return out.contiguous(memory_format=self.memory_format)


def batches(split: Split, batch_size: int, normalize: Normalize, *, shuffle: bool = False,
            augment: AugmentConfig | None = None, generator: torch.Generator | None = None):
    """Yield (float images, labels) batches from a split that already sits on the training device."""
    n = len(split)
    order = torch.randperm(n, generator=generator).to(split.labels.device) if shuffle else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
        images, labels = split.images[idx], split.labels[idx]
        if augment is not None:
            images = random_crop(images, augment.crop_padding, generator)
            if augment.flip:
                images = random_flip(images, generator)
        yield normalize(images), labels
