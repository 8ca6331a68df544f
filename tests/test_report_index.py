"""``ablate report`` end to end (ablation/report/index.py): every figure and table of a run
folder and an index.html whose links exist, showing the Markdown's tables, the run's state and
its provenance; a partial run says so."""

from html.parser import HTMLParser

import pytest
from conftest import ablate, run_sweep_in_process, small_sweep


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


@pytest.mark.slow
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
