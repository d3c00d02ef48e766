"""Every shipped config loads, and says what it claims to."""

from pathlib import Path

import pytest

from edgenas.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    config = load_config(path)
    assert config.search.history_size == 5


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenette"])
def test_paper_configs_reproduce_the_papers_setup(name):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    t, g = config.train, config.llm.generator
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (1, 128, 0.01, 0.9, 5e-4)
    assert (g.backend, g.model, g.temperature, g.top_p, g.max_tokens) == ("transformers", "Qwen/Qwen2.5-7B-Instruct", 0.7, 0.9, 2048)
    assert config.llm.improver == g and config.search.iterations == 2000


def test_quickstart_needs_no_llm_and_no_gpu():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert config.llm.generator.backend == "mutate" and config.eval.device == "cpu"
