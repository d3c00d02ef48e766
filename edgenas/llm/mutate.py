"""The `mutate` backend: random structural edits of the best program, with no LLM at all.

A classic evolutionary baseline. It lets the search loop run anywhere (a CPU quickstart needs no model) and gives
LLM searches a floor to beat. Programs carry their architecture as a small genome in a first-line comment, so the
next edit starts from the genome rather than from parsing Python.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from string import Template

GENOME_TAG = "# edgenas-genome: "
KERNELS = (3, 5, 7)
ACTIVATIONS = {"relu": "nn.ReLU()", "gelu": "nn.GELU()", "silu": "nn.SiLU()", "hardswish": "nn.Hardswish()"}
NORMS = {"batch": "nn.BatchNorm2d(channels)", "group": "nn.GroupNorm(8, channels)", "none": "nn.Identity()"}
POOLS = {"avg": "nn.AdaptiveAvgPool2d(1)", "max": "nn.AdaptiveMaxPool2d(1)"}
DROPOUTS = (0.0, 0.1, 0.2, 0.3)
MIN_CHANNELS, MAX_CHANNELS = 8, 256  # multiples of 8, so GroupNorm(8, c) always divides
MAX_BLOCKS, MAX_STAGES = 4, 5
# Convolutions pad by kernel // 2, so a stride-2 stage never shrinks a map below 1x1; the cap keeps 32x32 inputs
# at 2x2 or more before pooling, where features still carry some spatial layout.
MAX_DOWNSAMPLING = 4
WIDTH_FACTORS = (0.5, 0.75, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class Stage:
    channels: int
    blocks: int
    kernel: int
    stride: int
    skip: bool


@dataclass(frozen=True)
class Genome:
    """A residual CNN: stem conv, stages of blocks, global pooling, dropout, linear head. Invalid values raise."""

    stem: int
    stages: tuple[Stage, ...]
    activation: str = "relu"
    norm: str = "batch"
    pool: str = "avg"
    dropout: float = 0.0

    def __post_init__(self):
        if not _valid(self):
            raise ValueError(f"invalid genome: {self}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Genome:
        data = json.loads(text)
        return cls(**{**data, "stages": tuple(Stage(**s) for s in data["stages"])})


def _valid(g: Genome) -> bool:
    """Hand-edited comments reach `parse`, so types are checked too (JSON true is not a stride)."""

    def whole(v, low, high):
        return type(v) is int and low <= v <= high

    def stage_ok(s):
        return (isinstance(s, Stage) and whole(s.channels, MIN_CHANNELS, MAX_CHANNELS) and s.channels % 8 == 0
                and whole(s.blocks, 1, MAX_BLOCKS) and type(s.kernel) is int and s.kernel in KERNELS
                and whole(s.stride, 1, 2) and type(s.skip) is bool)

    return (whole(g.stem, MIN_CHANNELS, MAX_CHANNELS) and g.stem % 8 == 0
            and isinstance(g.stages, tuple) and 1 <= len(g.stages) <= MAX_STAGES and all(map(stage_ok, g.stages))
            and sum(s.stride == 2 for s in g.stages) <= MAX_DOWNSAMPLING
            and g.activation in ACTIVATIONS and g.norm in NORMS and g.pool in POOLS
            and type(g.dropout) is float and g.dropout in DROPOUTS)


def initial_genome() -> Genome:
    """Three stages of 16/32/64 channels: about 78k parameters on CIFAR-10, trains in seconds per epoch on a GPU."""
    return Genome(stem=16, stages=(Stage(16, 1, 3, 1, True), Stage(32, 1, 3, 2, True), Stage(64, 1, 3, 2, True)))


# ---------------------------------------------------------------- genome <-> program text

_PROGRAM = Template('''\
$tag$genome
"""A residual CNN from the mutate baseline (random structural edits of the best program, no LLM)."""

STEM = $stem
STAGES = [  # (channels, blocks, kernel, stride, skip); the stride applies to a stage's first block
$stages]
DROPOUT = $dropout


def act():
    return $act


def norm(channels):
    return $norm


def conv(cin, cout, kernel, stride=1):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=$bias)


class Block(nn.Module):
    """Two convolutions; with skip, a shortcut adds the input back (1x1 projection when the shape changes)."""

    def __init__(self, cin, cout, kernel, stride, skip):
        super().__init__()
        self.body = nn.Sequential(
            conv(cin, cout, kernel, stride), norm(cout), act(), conv(cout, cout, kernel), norm(cout)
        )
        self.shortcut = None
        if skip:
            same = cin == cout and stride == 1
            self.shortcut = nn.Identity() if same else nn.Sequential(conv(cin, cout, 1, stride), norm(cout))
        self.act = act()

    def forward(self, x):
        y = self.body(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.act(y)


class Net(nn.Module):
    def __init__(self, in_shape=(3, 32, 32), num_classes=10):
        super().__init__()
        layers = [conv(in_shape[0], STEM, 3), norm(STEM), act()]
        cin = STEM
        for channels, blocks, kernel, stride, skip in STAGES:
            for i in range(blocks):
                layers.append(Block(cin, channels, kernel, stride if i == 0 else 1, skip))
                cin = channels
        self.features = nn.Sequential(*layers)
        self.pool = $pool
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(DROPOUT), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))
''')


def render(genome: Genome) -> str:
    """A complete candidate module; the genome rides along on line 1 so `parse` can recover it."""
    stages = "".join(f"    ({s.channels}, {s.blocks}, {s.kernel}, {s.stride}, {s.skip}),\n" for s in genome.stages)
    return _PROGRAM.substitute(
        tag=GENOME_TAG, genome=genome.to_json(), stem=genome.stem, stages=stages, dropout=genome.dropout,
        act=ACTIVATIONS[genome.activation], norm=NORMS[genome.norm], bias=genome.norm == "none",
        pool=POOLS[genome.pool],
    )


def parse(code: str) -> Genome | None:
    """The genome from a program's first-line comment; None when there is none or it is not a valid genome."""
    first = code.lstrip().partition("\n")[0]
    if not first.startswith(GENOME_TAG):
        return None
    try:
        return Genome.from_json(first[len(GENOME_TAG):])
    except (ValueError, TypeError, KeyError):
        return None


# ---------------------------------------------------------------- mutations
# Each edit returns (genome, description), or None where it does not apply to this genome.


def _width(g: Genome, rng: random.Random):
    target = rng.randrange(len(g.stages) + 1)  # 0 is the stem
    old = g.stem if target == 0 else g.stages[target - 1].channels
    options = sorted({min(MAX_CHANNELS, max(MIN_CHANNELS, round(old * f / 8) * 8)) for f in WIDTH_FACTORS} - {old})
    new = rng.choice(options)
    where = "the stem" if target == 0 else f"stage {target}"
    text = f"{'widen' if new > old else 'narrow'} {where} from {old} to {new} channels"
    if target == 0:
        return replace(g, stem=new), text
    return _set_stage(g, target - 1, channels=new), text


def _depth(g: Genome, rng: random.Random):
    i = rng.randrange(len(g.stages))
    s, n = g.stages[i], len(g.stages)
    edits = []
    if s.blocks < MAX_BLOCKS:
        edits.append((_set_stage(g, i, blocks=s.blocks + 1),
                      f"add a block to stage {i + 1} ({s.blocks} -> {s.blocks + 1})"))
    if s.blocks > 1:
        edits.append((_set_stage(g, i, blocks=s.blocks - 1),
                      f"remove a block from stage {i + 1} ({s.blocks} -> {s.blocks - 1})"))
    if n < MAX_STAGES:
        if i == n - 1 and sum(t.stride == 2 for t in g.stages) < MAX_DOWNSAMPLING:
            # a new last stage goes deeper, as in most CNNs: half the map, twice the width
            new = replace(s, channels=min(MAX_CHANNELS, 2 * s.channels), blocks=1, stride=2)
        else:
            new = replace(s, blocks=1, stride=1)
        edits.append((replace(g, stages=g.stages[:i + 1] + (new,) + g.stages[i + 1:]),
                      f"add a stage of one block ({new.channels} channels, stride {new.stride}) after stage {i + 1}"))
    if n > 1:
        edits.append((replace(g, stages=g.stages[:i] + g.stages[i + 1:]),
                      f"remove stage {i + 1} ({s.channels} channels, {s.blocks} block{'s' * (s.blocks > 1)})"))
    return rng.choice(edits)


def _kernel(g: Genome, rng: random.Random):
    i = rng.randrange(len(g.stages))
    old = g.stages[i].kernel
    new = rng.choice([k for k in KERNELS if k != old])
    return _set_stage(g, i, kernel=new), f"change the kernel size of stage {i + 1} from {old}x{old} to {new}x{new}"


def _stride(g: Genome, rng: random.Random):
    i = rng.randrange(len(g.stages))
    if g.stages[i].stride == 2:
        return _set_stage(g, i, stride=1), f"stop downsampling in stage {i + 1} (stride 2 -> 1)"
    if sum(s.stride == 2 for s in g.stages) >= MAX_DOWNSAMPLING:
        return None
    return _set_stage(g, i, stride=2), f"downsample at the start of stage {i + 1} (stride 1 -> 2)"


def _skip(g: Genome, rng: random.Random):
    i = rng.randrange(len(g.stages))
    on = not g.stages[i].skip
    return _set_stage(g, i, skip=on), f"turn {'on' if on else 'off'} the skip connections of stage {i + 1}"


def _choice(field: str, values, noun: str):
    def edit(g: Genome, rng: random.Random):
        old = getattr(g, field)
        new = rng.choice([v for v in values if v != old])
        return replace(g, **{field: new}), f"change the {noun} from {old} to {new}"

    return edit


def _set_stage(g: Genome, i: int, **changes) -> Genome:
    return replace(g, stages=g.stages[:i] + (replace(g.stages[i], **changes),) + g.stages[i + 1:])


EDITS = (
    _width, _depth, _kernel, _stride, _skip,
    _choice("activation", list(ACTIVATIONS), "activation"), _choice("norm", list(NORMS), "normalisation"),
    _choice("pool", list(POOLS), "global pooling"), _choice("dropout", DROPOUTS, "dropout before the head"),
)


def mutate(genome: Genome, rng: random.Random) -> tuple[Genome, str]:
    """One random edit that keeps the genome valid and changes it; the description reads as a sentence."""
    while True:  # the activation edit always applies, so this ends
        result = rng.choice(EDITS)(genome, rng)
        if result is not None and result[0] != genome:
            return result


class MutateProposer:
    """The search loop's handle: same shape of answer as an LLM proposal, with no model behind it."""

    def propose(self, best_code: str | None, rng: random.Random) -> tuple[str, str, str]:
        """(problem, modification, code): one edit of the best program's genome, or the default to start from."""
        genome = parse(best_code) if best_code is not None else None
        if genome is None:
            problem = ("no valid program yet" if best_code is None
                       else "the best program has no genome: starting from the default architecture")
            start = initial_genome()
            widths = ", ".join(str(s.channels) for s in start.stages)
            return problem, f"start from the default residual CNN (stages of {widths} channels)", render(start)
        new, description = mutate(genome, rng)
        return "random exploration around the best program (mutate baseline)", description, render(new)
