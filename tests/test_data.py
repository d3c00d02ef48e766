import pytest
import torch

from edgenas.config import AugmentConfig, DatasetConfig
from edgenas.data import DataError, Normalize, batches, load_data, random_crop, random_flip

from .conftest import SHARED_CIFAR, write_cifar100, write_image_folder


def test_validation_split_is_held_out_fixed_and_independent_of_subset():
    cfg = DatasetConfig(name="synthetic", val_size=100, synthetic_size=600)
    a, b = load_data(cfg), load_data(cfg.model_copy(update={"train_subset": 50}))
    assert len(a.val) == 100 and len(a.train) == 500 and len(b.train) == 50
    assert torch.equal(a.val.images, b.val.images)
    assert a.train.images.dtype == torch.uint8 and a.in_shape == (3, 32, 32)
    seen = {t.numpy().tobytes() for t in a.train.images}
    assert not any(v.numpy().tobytes() in seen for v in a.val.images)


def test_random_crop_shifts_within_padding_and_flip_mirrors():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    crops = random_crop(images, 2, g)
    assert crops.shape == images.shape
    padded = torch.nn.functional.pad(images, (2,) * 4)
    for i in range(2):  # each crop is some window of its own padded image
        windows = padded[i, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert any(torch.equal(w, crops[i, 0]) for w in windows)
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(2))


def test_batches_normalise_and_cover_the_split():
    data = load_data(DatasetConfig(name="synthetic", val_size=10, synthetic_size=110))
    norm = Normalize(data.mean, data.std, "cpu")
    got = list(batches(data.train, 32, norm, shuffle=True, augment=AugmentConfig(), generator=torch.Generator()))
    assert [len(y) for _, y in got] == [32, 32, 32, 4]
    x = torch.cat([x for x, _ in batches(data.train, 50, norm)])
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_folder_dataset_reads_images_and_caches_outside_the_data(small_folder, tmp_path):
    cfg = DatasetConfig(name="folder", root=str(small_folder), val_size=50, cache_dir=str(tmp_path))
    data = load_data(cfg, ("train", "val", "test"))
    assert data.classes[0] == "airplane" and data.num_classes == 10
    assert len(data.train) == 250 and len(data.test) == 100 and data.in_shape == (3, 32, 32)
    assert list((tmp_path / "datasets").glob("folder-*.pt")) and not list(small_folder.rglob("*.pt"))
    again = load_data(cfg, ("train", "val", "test"))
    assert torch.equal(again.train.images, data.train.images)


def test_folder_resizes_to_image_size(small_folder, tmp_path):
    cfg = DatasetConfig(name="folder", root=str(small_folder), val_size=50, image_size=20, cache_dir=str(tmp_path))
    assert load_data(cfg).in_shape == (3, 20, 20)


def test_cifar100_loader_reads_torchvision_format(tmp_path):
    root = write_cifar100(tmp_path / "c100")
    data = load_data(DatasetConfig(name="cifar100", root=str(root), val_size=50, cache_dir=str(tmp_path / "cache")), ("train", "val", "test"))
    assert data.num_classes == 100 and len(data.train) == 250 and len(data.test) == 100


def test_missing_dataset_says_where_to_put_it(tmp_path):
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path / "none"), download=False, cache_dir=str(tmp_path))
    try:
        load_data(cfg)
    except DataError as e:
        assert "cifar-10-batches-py" in str(e) and str(tmp_path / "none") in str(e)
    else:
        raise AssertionError("expected DataError")


def test_imagenette_reads_train_and_val_at_160(tmp_path):
    """Three images per class of each split: the real ImageNette where ../shared has it, else generated ones of
    another size under ImageNette's class names (the resize to 160 is then tested too)."""
    import shutil

    source, root = SHARED_CIFAR.parent / "imagenette2-160", tmp_path / "inette"
    if (source / "train").is_dir():
        for split in ("train", "val"):
            for cls in sorted(p.name for p in (source / split).iterdir()):
                (root / split / cls).mkdir(parents=True)
                for image in sorted((source / split / cls).iterdir())[:3]:
                    shutil.copy(image, root / split / cls / image.name)
    else:
        write_image_folder(root, {"train": 3, "val": 3}, size=(213, 160), classes=[f"n0{i:07d}" for i in range(10)])
    cfg = DatasetConfig(name="imagenette", root=str(root), val_size=10, cache_dir=str(tmp_path / "cache"))
    data = load_data(cfg, ("train", "val", "test"))
    assert data.in_shape == (3, 160, 160) and data.num_classes == 10 and len(data.test) == 30
    assert data.classes[0].startswith("n0")


def test_a_damaged_cifar_file_is_reported_as_damaged(tmp_path):
    root = write_cifar100(tmp_path / "c100")
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle at all")
    cfg = DatasetConfig(name="cifar100", root=str(root), val_size=50, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="damaged or not CIFAR .*UnpicklingError") as caught:
        load_data(cfg)
    assert "download" not in str(caught.value) and "\n" not in str(caught.value)
