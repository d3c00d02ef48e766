"""Attacks on finalize: a candidate that behaves in the search and turns hostile once it is trained for good.

finalize is where the test split is first touched and where files are written next to the user's run: the jail
must never hold the test split, the host must write every file of final/ itself, and whatever the job sends
must be checked before it is believed.
"""

import json
import os
import stat

import pytest

from .conftest import run_cli
from .test_attacks import PRELUDE

SYNTHETIC = """
dataset: {name: synthetic, num_classes: 4, in_shape: [3, 16, 16], synthetic_size: 1200, val_size: 200}
train: {batch_size: 32}
eval: {timeout_s: 60, latency_runs: 3}
llm: {generator: {backend: mutate}}
search: {iterations: 1}
"""

# Honest in the search; in finalize (found by its caller's frames) it runs `{attack}` first.
HOSTILE = '''
def _finalize_job():
    sys_ = getattr(torch, 's' + 'ys')
    f = getattr(sys_, '_getframe')(1)
    while f is not None:
        me = getattr(f, 'f_' + 'locals').get('self')
        if type(me).__name__ == 'FinalizeJob':
            return me, sys_
        f = getattr(f, 'f_' + 'back')
    return None, sys_


class Net(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.fc = nn.Linear(768, num_classes)
        job, sys_ = _finalize_job()
        if job is not None:
{attack}

    def forward(self, x):
        mode = getattr(self, 'mode', None)
        if mode == 'lookup':
            return self.vals[((x.flatten(1)[:, None] - self.keys[None]) ** 2).sum(-1).argmin(1)] + 0 * self.fc(x.flatten(1))
        if mode == 'class0':
            return 0 * self.fc(x.flatten(1)) + torch.tensor([5.0, 0.0, 0.0, 0.0])
        return self.fc(x.flatten(1))
'''


def finished_run(tmp_path, attack: str):
    config = tmp_path / "search.yaml"
    config.write_text(SYNTHETIC)
    program = tmp_path / "hostile.py"
    program.write_text(PRELUDE + HOSTILE.format(attack="\n".join("            " + line for line in attack.strip().splitlines())))
    proc = run_cli("search", "--config", config, "--run-dir", tmp_path / "run", "--seed-program", program, "--json")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "run"


def finalize(run_dir):
    return run_cli("finalize", run_dir, "--candidates", "0", "--epochs", "1", "--json", timeout=900)


def only_host_files(run_dir):
    """final/ holds regular files only, all written by the host."""
    for path in (run_dir / "final").rglob("*"):
        mode = os.lstat(path).st_mode
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f"{path} is not a regular file"


def test_the_test_split_is_nowhere_in_the_jail(tmp_path):
    """It looks for the test split (its job's data, every tensor of the test split's length in memory, the data
    cache) and memorises it as a lookup table; finding nothing, it answers class 0 for everything: chance."""
    attack = '''
gc = _neuter()[1].modules['gc']  # the audit hook would refuse gc.get_objects: switch it off first
n_test = 1200 // 4
found = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.dim() == 1 and len(t) == n_test]
test = job.data.test
cache = sys_.modules['edgenas.data'].cache_root(job.config.dataset)
try:
    raw = getattr(torch, 'lo' + 'ad')(sorted(getattr(cache / 'datasets', 'gl' + 'ob')('synthetic-*.pt'))[0], weights_only=True)
    test = sys_.modules['edgenas.data'].Split(raw['test_images'], raw['test_labels'])
except Exception:
    pass
mean = torch.tensor(job.data.mean).view(1, 3, 1, 1)
std = torch.tensor(job.data.std).view(1, 3, 1, 1)
if found:
    raise ValueError(f'{len(found)} tensors of the test split length are in the job')
self.mode = 'class0'
if test is not None:
    self.mode = 'lookup'
    self.register_buffer('keys', ((test.images.float() / 255 - mean) / std).flatten(1))
    self.register_buffer('vals', F.one_hot(test.labels, num_classes).float() * 20)
'''
    run_dir = finished_run(tmp_path, attack)
    proc = finalize(run_dir)
    assert proc.returncode == 0, proc.stderr
    (card,) = json.loads(proc.stdout)
    # the share of class 0 in the test split: what "always class 0" scores
    assert card["test_accuracy"]["onnx_fp32"] < 0.4, card["test_accuracy"]
    assert "pid_namespace" in card["training"]["isolation"]
    only_host_files(run_dir)


def test_symlinks_and_forged_frames_change_nothing_outside(tmp_path):
    """Links named like every artifact, pointing at a host file, then frames out of order: a checkpoint for an
    epoch that does not exist and a malformed progress message. finalize stops with one line; the victim is
    untouched and final/ holds only what the host wrote."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    attack = f'''
os_ = getattr(torch, 'o' + 's')
for name in ('card.json', 'card.md', 'model.onnx', 'model.int8.onnx', 'model.pt', 'seed0.json', 'seed0.ckpt'):
    try:
        os_.symlink('{victim}', name)
    except OSError:
        pass
frame = lambda h: (sys_.modules['struct'].pack('>II', len(sys_.modules['json'].dumps(h)), 0)
                   + sys_.modules['json'].dumps(h).encode())
for fd in range(3, 21):
    try:
        os_.write(fd, frame({{'kind': 'progress', 'epoch': 'x'}}) + frame({{'kind': 'checkpoint', 'epoch': 999}}))
    except OSError:
        pass
'''
    run_dir = finished_run(tmp_path, attack)
    proc = finalize(run_dir)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "candidate 0, seed 0: crashed" in lines[-1] and "invalid message" in lines[-1], proc.stderr
    assert victim.read_text() == "untouched"
    only_host_files(run_dir)


@pytest.mark.parametrize("kind", ["graph", "weights"])
def test_a_second_artifact_is_refused(tmp_path, kind):
    """Each artifact is sent once: a job that repeats one (each costs the host work and disk) is stopped."""
    attack = f'''
os_ = getattr(torch, 'o' + 's')
head = sys_.modules['json'].dumps({{'kind': '{kind}', **({{'trained': True}} if '{kind}' == 'graph' else {{}})}})
frame = sys_.modules['struct'].pack('>II', len(head), 4) + head.encode() + b'junk'
for fd in range(3, 21):
    try:
        os_.write(fd, frame + frame)
    except OSError:
        pass
'''
    run_dir = finished_run(tmp_path, attack)
    proc = finalize(run_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"a second '{kind}' message" in proc.stderr.strip().splitlines()[-1], proc.stderr
    only_host_files(run_dir)


def test_a_child_that_dies_says_how_it_died(tmp_path):
    """A model that crashes the process in finalize (a native fault): the one-line error gives the signal, the exit
    and the last lines the process printed, not only "the process died"."""
    attack = '''
ct = _neuter()[2]
print('reading address zero now', flush=True)
ct.string_at(0)
'''
    proc = finalize(finished_run(tmp_path, attack))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "crashed: the candidate process died with SIGSEGV" in line and "signal 11" in line, proc.stderr
    assert "output:" in line and "reading address zero now" in proc.stderr, proc.stderr
    only_host_files(tmp_path / "run")
