import pytest

from edgenas.config import ConfigError, load_config


def test_defaults_are_the_papers_protocol():
    cfg = load_config()
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (1.0, 128, 0.01, 0.9, 5e-4)
    assert cfg.dataset.val_size == 5000 and t.augment.crop_padding == 4 and t.augment.flip


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  name: synthetic\ntrain:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=0.05", "budget.max_params=1000", "dataset.in_shape=[1, 8, 8]"])
    assert cfg.train.lr == 0.05 and cfg.budget.max_params == 1000 and cfg.dataset.in_shape == (1, 8, 8)


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train.batch_size=big", "config key 'train.batch_size'"),
    ("dataset.name=mnist", "config key 'dataset.name'"),
    ("nonsense", "--set expects key=value"),
    ("budget.max_target_latency_ms=5", "budget.max_target_latency_ms needs a `target` section"),
    ("target.url=http://127.0.0.1:8765", "target.url needs target.token_file"),
    ("target.url=127.0.0.1:8765", "target.url must start with http:// or https://"),
    ("target.precision=int4", "config key 'target.precision'"),
    ("target.url=http://me:secret@10.0.0.2:8765", "target.url must not hold credentials"),
])
def test_bad_keys_are_one_line_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
