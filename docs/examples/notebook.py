# %% [markdown]
# # A run folder in a notebook: `ablation.open_run`
#
# Percent-format cells: VS Code runs them as a notebook as they are, Jupyter opens the file as one
# with jupytext (`pip install jupytext`), and `python docs/examples/notebook.py [RUN] [OUT]
# [GAP_PP]` runs it as a script (the tests do). It reads the digits demo (`scripts/demo.sh`
# makes it) unless given another run folder or an `s3://` URI, also one still running: it then
# shows the epochs so far, and `run.refresh()` reads the new ones.
#
# It draws what `ablate report` does not: the robust generalisation gap (train - test robust
# accuracy) of every setting on one axis, and computes, per trial, the first epoch at which that
# gap exceeds GAP_PP percentage points (a widening gap is the mark of robust overfitting).
#
# On the digits demo this shows the workflow only: adversarial training on digits does not
# overfit robustly (its gap wanders and does not widen), so its onset epochs mean nothing; run
# it on a CIFAR or SVHN sweep for numbers worth reading.

# %%
import sys
from pathlib import Path

# A magic that jupytext uncomments: Jupyter then draws every Figure below as an image (in VS
# Code, run `%matplotlib inline` once if one shows as text).
# %matplotlib inline
import matplotlib.pyplot as plt

from ablation import open_run

# Jupyter's kernel has arguments of its own, so only a script takes RUN, OUT and GAP_PP from argv.
args = [] if "ipykernel" in sys.modules else sys.argv[1:]
# The repository: a script runs from it, a notebook's kernel starts here in docs/examples/.
ROOT = Path.cwd() if Path("sweeps").is_dir() else Path("../..")
RUN = args[0] if len(args) > 0 else ROOT / "runs" / "demo_digits"
# The digits demo's gaps stay under 10 pp; choose the level for your own data.
GAP_PP = float(args[2]) if len(args) > 2 else 7.5  # percentage points

run = open_run(RUN)
OUT = Path(args[1]) if len(args) > 1 else ROOT / "reports" / run.name / "notebook"
run

# %% [markdown]
# The DataFrames: `run.curves` (one row per trial and epoch, with `label` and `complete`),
# `run.summary` (one row per finished trial), `run.configs` (every trial's full config, its label
# and state) and `run.status` (as `ablate status` prints it).

# %%
run.configs[["key", "label", "intervention", "layers", "seed", "epochs", "state"]]

# %%
run.status

# %% [markdown]
# The figures and tables of `ablate report`, built by the same code: dicts by the file stem the
# report saves them under. A Table has `display` (as the report shows it), `numbers` (raw, in
# percent) and `notes`.

# %%
best_last = run.tables("best-last")["best-last"]
best_last.display

# %%
figures = run.figures("fix_lr")
next(iter(figures.values()), None)  # the fix_lr grid of the first setting, if the run has one

# %% [markdown]
# ## A custom comparison: the robust generalisation gap of every setting
#
# The gap is the eval-mode robust accuracy on the fixed train subset minus the test robust
# accuracy (both PGD, measured on the same weights each epoch), in percentage points, averaged
# over seeds. A trial still running ends in an open circle.

# %%
curves = run.curves.assign(
    gap=100 * (run.curves.train_eval_robust_acc - run.curves.test_robust_acc))
fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
for name, rows in curves.groupby("label"):
    mean = rows.groupby("epoch").gap.mean()
    (line,) = ax.plot(mean.index, mean.to_numpy(), label=name)
    if not rows.complete.all():
        ax.plot(mean.index[-1:], mean.to_numpy()[-1:], "o", markerfacecolor="white",
                color=line.get_color())
ax.axhline(GAP_PP, color="grey", linestyle=":", label=f"{GAP_PP:g} pp")
ax.set_xlabel("Epoch (0-based)")
ax.set_ylabel("Robust train - test accuracy (pp)")
ax.set_title(f"{run.name}: robust generalisation gap"
             + (" (digits: workflow only)" if set(run.curves.dataset) == {"digits"} else ""))
ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "robust_gap.png", dpi=150)  # Jupyter shows it below the cell

# %% [markdown]
# ## A number the reports do not give: when the gap first exceeds GAP_PP
#
# Per trial, the first epoch whose gap is above GAP_PP (NaN: not yet, or never).

# %%
onset = curves[curves.gap > GAP_PP].groupby("key").epoch.min().rename("gap_onset_epoch")
trials = (curves.groupby("key")[["label", "seed", "complete"]].last()
          .join(curves.groupby("key").epoch.max().rename("last_epoch")).join(onset))
trials.to_csv(OUT / "gap_onset.csv")
print(f"{run.name}: first epoch with a robust gap above {GAP_PP:g} pp, per trial")
if set(run.curves.dataset) == {"digits"}:
    print("(digits: the workflow only; digits shows no robust overfitting, so read nothing into "
          "these epochs)")
print(trials.to_string())
print(f"wrote {OUT / 'robust_gap.png'} and {OUT / 'gap_onset.csv'}")
trials
