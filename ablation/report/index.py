"""``index.html``: one self-contained page with every figure and table of a run, openable from
disk: a table of contents, the run's state, provenance, then the figures and the tables as the
Markdown has them (same columns, same footnotes), each with links to its files."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .. import __version__, files
from ..io import atomic_path
from . import RunData
from .tables import WrittenTable
from .writers import html_table

# The fields provenance.provenance() adds to each trial's summary.json (not imported: it loads
# torch); test_index_provenance_fields_match_the_trainers guards the two lists.
PROVENANCE = ("ablate_version", "git_commit", "torch_version", "cuda_version", "device_name")
STATES = ("done", "running", "interrupted", "errored", "pending")  # store.status_table's states
_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
          "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;"
          "font-size:0.9em;margin-top:1em}caption{text-align:left;font-weight:bold;"
          "padding:4px 0}td,th{border:1px solid #ccc;padding:2px 6px}td.num{text-align:right}"
          "td.id{text-align:left}.fn{font-size:0.85em;margin:0.2em 0}.note{color:#a40}")


def trial_states(run: RunData) -> dict[str, int]:
    """How many trials are done, running, interrupted, errored or pending (``ablate status``'s
    count); for data without a run folder, done / running from its curves alone."""
    from ..store import RunDir, status_table

    if (Path(run.root) / files.SWEEP).exists():
        table, _ = status_table(RunDir.open(run.root))
        counts = table.state.value_counts()
    else:
        complete = run.curves.groupby("key").complete.last()
        counts = pd.Series({"done": int(complete.sum()), "running": int((~complete).sum())})
    return {s: int(counts[s]) for s in STATES if counts.get(s, 0)}


def _provenance(run: RunData) -> list[tuple[str, str]]:
    """(field, "value (n trials)", ...) for each provenance field the summaries record."""
    rows = [("report written by ablate", __version__)]
    for field in PROVENANCE:
        if field in run.summary:
            values = run.summary[field].fillna("none").astype(str).value_counts()
            rows.append((field, ", ".join(f"{v} ({n} trial{'s' if n > 1 else ''})"
                                          for v, n in values.items())))
    if not any(f in run.summary for f in PROVENANCE):
        rows.append(("trials", "no finished trial records its provenance yet"))
    return rows


def write_index(out: Path, run: RunData, figures: list[Path], tables: list[WrittenTable]) -> Path:
    """Link every PNG (with its PDF) and show every table from its Table (not its CSV) with its
    footnotes and links to its files; relative links only, all text escaped."""
    esc = html.escape
    toc = ["<li><a href='#state'>Run state</a></li>",
           "<li><a href='#provenance'>Provenance</a></li>"]
    body = []
    states = trial_states(run)
    body.append("<h2 id='state'>Run state</h2><p>" + esc(
        f"{sum(states.values())} trials: " + ", ".join(f"{n} {s}" for s, n in states.items()))
        + "</p>")
    if run.partial:
        body.append("<p class='note'>Partial run: some trials are still running; their "
                    "curves and numbers are as far as they got (marked as such).</p>")
    body.append("<h2 id='provenance'>Provenance</h2><table>" + "".join(
        f"<tr><td class='id'>{esc(k)}</td><td class='id'>{esc(v)}</td></tr>"
        for k, v in _provenance(run)) + "</table>")
    pngs = [p for p in figures if p.suffix == ".png"]
    _section(toc, body, "figures", "Figures", [(f"fig-{p.stem}", p.stem) for p in pngs])
    for png in pngs:
        rel = png.relative_to(out).as_posix()
        pdf = png.with_suffix(".pdf")
        link = (f" (<a href='{esc(pdf.relative_to(out).as_posix())}'>PDF</a>)"
                if pdf in figures else "")
        body.append(f"<h3 id='fig-{esc(png.stem)}'>{esc(png.stem)}{link}</h3>"
                    f"<img src='{esc(rel)}' alt='{esc(png.stem)}'>")
    _section(toc, body, "tables", "Tables", [(f"tab-{t.stem}", t.stem) for t in tables])
    for written in tables:
        links = " · ".join(f"<a href='{esc(p.relative_to(out).as_posix())}'>{p.suffix[1:]}</a>"
                           for p in written.paths)
        body.append(f"<h3 id='tab-{esc(written.stem)}'>{esc(written.stem)} ({links})</h3>"
                    + html_table(written.table, written.caption, f"table-{written.stem}"))
    head = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(run.name)}</title>",
            f"<style>{_STYLE}</style></head><body>", f"<h1>{esc(run.name)}</h1>"]
    if run.description:
        head.append(f"<p>{esc(' '.join(run.description.split()))}</p>")
    head.append("<nav><h2>Contents</h2><ul>" + "".join(toc) + "</ul></nav>")
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join([*head, *body, "</body></html>"]), encoding="utf-8")
    return path


def _section(toc: list[str], body: list[str], anchor: str, title: str,
             entries: list[tuple[str, str]]) -> None:
    """A heading and its entry in the table of contents, with one sub-entry per (id, name)."""
    if entries:
        toc.append(f"<li><a href='#{anchor}'>{title}</a><ul>" + "".join(
            f"<li><a href='#{html.escape(i)}'>{html.escape(name)}</a></li>"
            for i, name in entries) + "</ul></li>")
        body.append(f"<h2 id='{anchor}'>{title}</h2>")
