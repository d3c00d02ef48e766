"""The HTML report: the numbers it derives (on hand-made archives), the file a real run gives (self-contained,
live while searching, several runs compared), and the page as a real browser renders it."""

import json
import re
import shutil

import pytest

from edgenas import history
from edgenas.archive import Archive
from edgenas.records import Candidate, EvalResult, Failure, FailureKind, Outcome, Status

from .conftest import PROGRAMS, run_cli
from .test_loop import search_config


def ok(iteration, acc, parent=None, best=False, chain=0, code=None, **kw):
    return Candidate(iteration=iteration, chain=chain, status="ok", parent=parent, is_best=best, created=60.0 * iteration,
                     code=code or f"x = {iteration}\n", outcome=Outcome(status="ok"), problem=f"p{iteration}",
                     modification=f"m{iteration}", result=EvalResult(status=Status.ok, val_accuracy=acc, params=100 * iteration + 1),
                     **kw)


def bad(iteration, kind, message, chain=0):
    return Candidate(iteration=iteration, chain=chain, status="failed", created=60.0 * iteration,
                     outcome=Outcome(status="failed", kind=kind, diagnostic=message),
                     result=EvalResult(status=Status.failed, failure=Failure(kind=FailureKind(kind), message=message)))


HAND_MADE = [ok(0, 0.30, best=True, code="a = 1\nb = 2\n", tokens_in=100, tokens_out=10, llm_seconds=2.0, eval_seconds=5.0,
                llm_calls=[{"role": "generator"}]),
             bad(1, "shape", "expected (2, 10), got (2, 12) in 'fc'"),
             ok(2, 0.40, parent=0, best=True, code="a = 1\nb = 3\n", tokens_in=200, tokens_out=20, llm_seconds=4.0,
                eval_seconds=5.0, llm_calls=[{"role": "improver"}, {"role": "generator"}]),
             bad(3, "shape", "expected (2, 10), got (2, 7) in 'head'"),
             ok(4, 0.35, parent=2, chain=1),
             bad(5, "oom", "out of memory"),
             ok(6, 0.45, parent=2, best=True, code="a = 2\nb = 3\n")]


def test_progress_valid_rate_and_failures_over_time():
    rows = history.progress(HAND_MADE)
    assert [r["best"] for r in rows] == [0.30, 0.30, 0.40, 0.40, 0.40, 0.40, 0.45]
    assert rows[4]["chain_best"] is None and rows[6]["minutes"] == 6.0
    assert [w["valid_rate"] for w in history.valid_rate(HAND_MADE, window=2)] == [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    over = history.failures_over_time(HAND_MADE, bins=4)
    assert over["edges"] == [0, 2, 4, 6] and over["counts"] == {"shape": [1, 1, 0, 0], "oom": [0, 0, 1, 0]}
    pending = Candidate(iteration=7, status="pending", outcome=Outcome(status="pending"))
    assert len(history.progress([*HAND_MADE, pending])) == 7  # in flight: not yet part of the story


def test_the_same_problem_counts_once_whatever_its_numbers():
    top = history.top_diagnostics(HAND_MADE)
    assert top[0] == {"kind": "shape", "diagnostic": "expected (N, N), got (N, N) in '…'", "count": 2}
    assert top[1]["kind"] == "oom" and top[1]["count"] == 1


def test_lineage_follows_parents_from_the_first_program_to_the_best_with_diffs():
    steps = history.lineage(HAND_MADE)
    assert [s["iteration"] for s in steps] == [0, 2, 6]
    assert steps[0]["delta"] is None and steps[1]["delta"] == pytest.approx(0.10) and steps[2]["delta"] == pytest.approx(0.05)
    assert "-b = 2\n+b = 3\n" in steps[1]["diff"] and "-a = 1\n+a = 2\n" in steps[2]["diff"]
    assert history.lineage([bad(0, "shape", "x")]) == []


def test_cost_per_iteration_and_per_improvement():
    c = history.cost(HAND_MADE)
    assert (c["iterations"], c["improvements"], c["llm_calls"], c["tokens_in"]) == (7, 3, 3, 300)
    assert c["llm_seconds_per_improvement"] == pytest.approx(2.0) and c["eval_seconds_per_iteration"] == pytest.approx(10 / 7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small real runs that differ in their memory window, with a live report written during the search."""
    tmp = tmp_path_factory.mktemp("report")
    out = []
    for name, k in (("k5", 5), ("k0", 0)):
        config = search_config(tmp, llm={"generator": {"backend": "mutate"}},
                               search={"iterations": 6, "history_size": k, "report_every": 2})
        proc = run_cli("search", "--config", config, "--run-dir", tmp / name, "--seed-program", PROGRAMS / "good_cnn.py")
        assert proc.returncode == 0, proc.stderr
        out.append(tmp / name)
    return out


def test_a_search_leaves_a_self_contained_report(runs):
    page = (runs[0] / "report.html").read_text()
    assert set(re.findall(r"<script\b[^>]*>", page)) == {"<script>"}  # plotly.js is inside: opens offline, or mailed
    assert not re.search(r"<link\b", page)
    assert 'http-equiv="refresh"' not in page  # the last rewrite, at the end of the search, stops reloading
    assert "Lineage of the best" in page and "Config as run" in page and "Machine and versions" in page
    rows = Archive(runs[0], readonly=True).all()
    assert json.dumps(rows[0].code)[1:30] in page  # every candidate's code, for a click on its point


def test_report_command_compares_runs_labelled_by_what_differs(runs, tmp_path):
    proc = run_cli("report", *runs, "-o", tmp_path / "both.html")
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "both.html").read_text()
    assert "k5: history_size=5" in page and "k0: history_size=0" in page
    assert run_cli("report", tmp_path).returncode == 2  # not a run directory: one line, exit 2
    live = tmp_path / "live"
    shutil.copytree(runs[0], live)
    from edgenas import html_report

    assert 'http-equiv="refresh"' in html_report.write([live], live / "r.html", live=True).read_text()
    run = html_report.load_run(live)  # code that would end or bend the page's script stays inside its string
    run.candidates[0] = run.candidates[0].model_copy(update={"code": "x = '<!--<script>'  # </script>\n"})
    page = html_report.render([run])
    assert "\\u003c!--\\u003cscript>" in page and "'<!--<script>'" not in page.split("const CODE")[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (see README: the test extras)")
def test_the_report_renders_in_a_real_browser(runs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((runs[0] / "report.html").as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 5")
        points = page.evaluate("""Array.from(document.querySelectorAll('.js-plotly-plot')).map(
            p => p.data.reduce((n, t) => n + (t.x ? t.x.length : 0), 0))""")
        drawn = page.evaluate("document.querySelectorAll('.js-plotly-plot .point, .js-plotly-plot .bars path').length")
        page.evaluate("""(() => { const p = document.querySelectorAll('.js-plotly-plot')[3];
            const pt = p.data.find(t => t.customdata && t.customdata.length).customdata[0];
            p.emit('plotly_click', {points: [{customdata: pt}]}); })()""")
        code = page.inner_text("#code")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert all(n > 0 for n in points[:4]), points  # progress by iteration and by time, valid rate, Pareto front
    assert drawn > 10 and "class Net" in code
