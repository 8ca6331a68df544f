"""``ablate evaluate`` and ``ablate report`` on run folders written by real (tiny) sweeps."""

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
from conftest import run_sweep_in_process, tiny_trial

from ablation.evaluate import evaluate_run


def ablate(*args):
    return subprocess.run([sys.executable, "-m", "ablation", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def small_sweep():
    return {"name": "small", "base": tiny_trial(epochs=2, width=2, train_steps=1, test_steps=2),
            "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
            "baselines": {"AT": {"intervention": "none"}}}


def test_evaluate_adds_autoattack_to_finished_trials_only_and_resumes(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small", stop_after={0: 1})
    logged = []
    assert len(evaluate_run(root, 8, echo=logged.append)) == 1  # the unfinished trial waits
    table = pd.read_parquet(root / "summary.parquet")
    (row,) = table.itertuples()
    assert row.autoattack_n == 8 and 0 <= row.best_autoattack_acc <= 1
    assert evaluate_run(root, 8, echo=logged.append) == []  # nothing left to do
    assert len(evaluate_run(root, 4, echo=logged.append)) == 1  # another size: done again


def test_an_evaluation_stopped_after_the_best_weights_does_not_attack_them_again(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small")
    key = sorted(p.name for p in (root / "trials").iterdir())[0]
    # What a stop between the two attacks leaves behind (an impossible accuracy, to recognise).
    (root / "trials" / key / "autoattack.partial.json").write_text(
        json.dumps({"autoattack_n": 8, "best_autoattack_acc": 0.125}))
    evaluate_run(root, 8, echo=lambda m: None)
    table = pd.read_parquet(root / "summary.parquet").set_index("key")
    assert table.loc[key, "best_autoattack_acc"] == 0.125  # kept, not recomputed
    assert table.loc[key, "diff_autoattack_acc"] == 0.125 - table.loc[key, "last_autoattack_acc"]
    assert not (root / "trials" / key / "autoattack.partial.json").exists()


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("src", "href")]


def test_report_writes_everything_and_an_index_whose_links_exist(study_run, tmp_path):
    out = tmp_path / "report"
    done = ablate("report", study_run, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    parser = Links()
    parser.feed((out / "index.html").read_text())
    assert any(t.endswith(".png") for t in parser.targets)
    assert any(t.endswith(".tex") for t in parser.targets)
    for target in (t for t in parser.targets if not t.startswith("#")):
        assert (out / target).is_file(), target
    for name in ("fix_param", "fix_lr", "awp", "heatmap"):
        assert list(out.glob(f"{name}*.png")) and list(out.glob(f"{name}*.pdf")), name
    # The index shows the Markdown's tables (display names, footnotes), not raw CSV columns,
    # with a table of contents whose anchors exist, the run's state and provenance.
    page = (out / "index.html").read_text()
    assert "PGD-2 Best" in page and "pgd_best" not in page and "True" not in page
    assert "AutoAttack was not run." in page and "Holm-adjusted" in page
    anchors = [t[1:] for t in parser.targets if t.startswith("#")]
    assert "tab-best-last" in anchors and "state" in anchors
    assert all(f"id='{a}'" in page for a in anchors), anchors
    assert "47 trials: 47 done" in page
    assert "ablate_version" in page and "torch_version" in page


def test_report_single_figure_and_table_and_bad_input(study_run, tmp_path):
    out = tmp_path / "one"
    done = ablate("report", study_run, "--figure", "fix_lr", "--figure", "gap", "--table",
                  "best-last", "--out", out, "--metric", "train_robust_acc",
                  "--setting", "AT_awp_[4]", "--setting", "RAT_LR")  # a table's name
    assert done.returncode == 0, done.stderr[-3000:]
    written = [Path(p).name for p in done.stdout.split()]
    assert any(n.startswith("fix_lr") and n.endswith(".png") for n in written)
    assert [n for n in written if n.startswith("gap")] == [  # the chosen setting only
        "gap-synthetic-linf-preact_small-at.png", "gap-synthetic-linf-preact_small-at.pdf"]
    assert any(n.startswith("best-last") and n.endswith(".md") for n in written)
    assert not (out / "index.html").exists()
    methods = pd.read_csv(out / "best-last.csv").name.tolist()
    assert methods == ["AT", "RAT_LR", "RAT_WP", "AT_awp_[4]"]
    for args, needle in [((tmp_path,), "not an ablate run folder"),
                         ((study_run, "--figure", "bogus"), "bogus"),
                         ((study_run, "--metric", "colour"), "colour"),
                         ((study_run, "--metric", "dataset"), "dataset"),
                         ((study_run, "--setting", "AT_awp_[5]"), "AT_awp_[5]"),
                         ((study_run, "--setting", "RAT_XX"), "RAT_XX")]:
        bad = ablate("report", *args, "--out", tmp_path / "x")
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_report_on_a_partial_run_says_so(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small", stop_after={0: 1})
    done = ablate("report", root, "--out", tmp_path / "r")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial run" in done.stderr
    assert "Partial run" in (tmp_path / "r" / "index.html").read_text()


def test_index_provenance_fields_match_the_trainers():
    from ablation.provenance import provenance
    from ablation.report.index import PROVENANCE

    assert set(PROVENANCE) == set(provenance("cpu")), "index.PROVENANCE and provenance() differ"
