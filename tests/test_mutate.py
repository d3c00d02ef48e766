import random

import pytest
import torch

from edgenas.candidate import check_source, construct, load_module
from edgenas.llm.mutate import Genome, MutateProposer, Stage, initial_genome, mutate, parse, render

from .conftest import program

CHAINS, STEPS = 60, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny batches gain nothing from threads, and on a busy machine their barriers cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain(seed: int) -> list[tuple[Genome, str]]:
    rng, genome, steps = random.Random(seed), initial_genome(), []
    for _ in range(STEPS):
        genome, description = mutate(genome, rng)
        steps.append((genome, description))
    return steps


def build(code: str, in_shape, num_classes):
    assert check_source(code) is None, check_source(code)
    net, _ = construct(load_module(code)["Net"], in_shape, num_classes)
    with torch.no_grad():
        out = net(torch.randn(2, *in_shape))
    assert out.shape == (2, num_classes)
    return net


@pytest.mark.parametrize("seed", range(CHAINS))
def test_mutation_chains_render_working_programs(seed):
    previous = initial_genome()
    for genome, description in chain(seed):
        assert genome != previous and description.strip()
        code = render(genome)
        assert parse(code) == genome
        build(code, (3, 32, 32), 10)
        previous = genome
    build(code, (3, 64, 64), 100)


def test_initial_genome_is_small_and_large_inputs_work():
    code = render(initial_genome())
    params = sum(p.numel() for p in build(code, (3, 32, 32), 10).parameters())
    assert 50_000 <= params <= 150_000
    build(code, (1, 160, 160), 7)


def test_same_seed_same_chain():
    assert chain(7) == chain(7)
    assert chain(7) != chain(8)


def test_parse_rejects_missing_or_invalid_genomes():
    assert parse(program("good_cnn.py")) is None
    code = render(initial_genome())
    assert parse(code.replace('"stride": 2', '"stride": 3', 1)) is None
    assert parse(code.replace('"blocks": 1', '"blocks": true', 1)) is None
    assert parse(code.replace("{", "[", 1)) is None
    with pytest.raises(ValueError):
        Genome(stem=16, stages=())
    with pytest.raises(ValueError):
        Genome(stem=16, stages=(Stage(12, 1, 3, 1, True),))


def test_limits_hold_over_long_chains():
    rng, genome = random.Random(0), initial_genome()
    for _ in range(500):
        genome, _ = mutate(genome, rng)  # Genome validates itself, so an invalid edit would raise here
    assert parse(render(genome)) == genome


def test_proposer_starts_from_the_default_then_mutates():
    proposer = MutateProposer()
    problem, modification, code = proposer.propose(None, random.Random(0))
    assert "no valid program" in problem and modification and parse(code) == initial_genome()
    problem, _, code = proposer.propose(program("good_cnn.py"), random.Random(0))
    assert "no genome" in problem and parse(code) == initial_genome()

    best = render(initial_genome())
    problem, modification, code = proposer.propose(best, random.Random(3))
    assert "mutate baseline" in problem and modification
    assert parse(code) not in (None, initial_genome())
    assert (problem, modification, code) == proposer.propose(best, random.Random(3))


def test_every_kind_of_edit_happens():
    rng, genome, descriptions = random.Random(1), initial_genome(), ""
    for _ in range(300):
        genome, description = mutate(genome, rng)
        descriptions += description + "\n"
    for words in ("widen", "narrow", "add a block", "remove a block", "add a stage", "remove stage", "kernel size",
                  "stride", "skip", "activation", "normalisation", "pooling", "dropout"):
        assert words in descriptions, words
