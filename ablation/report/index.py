"""``index.html``: one page with every figure and table of a run, openable from disk."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from ..io import atomic_path


def write_index(out: Path, name: str, description: str, figures: list[Path],
                tables: list[Path], partial: bool) -> Path:
    """Link every PNG (with its PDF) and show every table (from its CSV); relative links only."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;"
             "font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             ".note{color:#a40}</style></head><body>",
             f"<h1>{html.escape(name)}</h1>"]
    if description:
        parts.append(f"<p>{html.escape(' '.join(description.split()))}</p>")
    if partial:
        parts.append("<p class='note'>Partial run: some trials are still running; their "
                     "curves and numbers are as far as they got (marked as such).</p>")
    if figures:
        parts.append("<h2>Figures</h2>")
    for png in (p for p in figures if p.suffix == ".png"):
        rel = png.relative_to(out).as_posix()
        pdf = png.with_suffix(".pdf")
        link = f" (<a href='{pdf.relative_to(out).as_posix()}'>PDF</a>)" if pdf in figures else ""
        parts.append(f"<h3>{html.escape(png.stem)}{link}</h3><img src='{rel}' "
                     f"alt='{html.escape(png.stem)}'>")
    if tables:
        parts.append("<h2>Tables</h2>")
    for csv in (p for p in tables if p.suffix == ".csv"):
        links = " · ".join(f"<a href='{p.relative_to(out).as_posix()}'>{p.suffix[1:]}</a>"
                           for p in tables if p.stem == csv.stem)
        frame = pd.read_csv(csv)
        parts.append(f"<h3>{html.escape(csv.stem)} ({links})</h3>"
                     + frame.to_html(index=False, na_rep="–", float_format="{:.2f}".format))
    parts.append("</body></html>")
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path
