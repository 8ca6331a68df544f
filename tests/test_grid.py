"""Sweep files: expansion into trials, order, stable unique keys, one-line refusals."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablation.config import from_dict
from ablation.errors import ConfigError
from ablation.grid import load_sweep, sweep_from_dict
from ablation.layers import ALL_SUBSETS

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
PREACT18 = ("cifar10_linf", "cifar10_l2", "cifar100_linf", "cifar100_l2", "svhn_linf", "svhn_l2")
# Counts designed in each file's header: 3 interventions x 15 subsets + AT + AWP = 47;
# WRN: (RAT_LR, RAT_WP, AT, AWP) x 5 seeds; TRADES: 15 + 2; architectures: 4 x (15 + 2);
# demo: 2 x 3 + AT + AWP.
COUNTS = {**{name: 47 for name in PREACT18}, "wrn34_cifar10_linf": 20,
          "trades_cifar10_linf": 17, "architectures_linf": 68, "demo_digits": 8}
# sweeps/tables/, the paper's table rows over 5 seeds: 2 threat models x (AT, RAT_LR, RAT_WP, AWP)
# x 5 per table and network; TRADES: (TRADES, TRADES-AWP, Table 5's 4 subsets) x 5.
TABLE_SWEEPS = {f"tables/table{n}_{dataset}_{net}": 40 for n, dataset in
                ((1, "cifar10"), (2, "cifar100"), (3, "svhn")) for net in ("preact18", "wrn34")}
COUNTS.update({**TABLE_SWEEPS, "tables/table4_5_trades": 30})


def test_every_shipped_sweep_is_tested():
    shipped = [*SWEEPS.glob("*.yaml"), *SWEEPS.glob("tables/*.yaml")]
    assert {p.relative_to(SWEEPS).with_suffix("").as_posix() for p in shipped} == set(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_sweeps_load_with_their_counts_and_unique_stable_keys(name):
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    assert sweep.name == name.rpartition("/")[2] and sweep.description
    assert len(sweep.trials) == COUNTS[name]
    keys = [t.key for t in sweep.trials]
    assert len(set(keys)) == len(keys) == len(sweep.by_key)
    assert [t.key for t in load_sweep(SWEEPS / f"{name}.yaml").trials] == keys
    assert sweep.total_epochs == sum(t.epochs for t in sweep.trials)


def test_keys_are_the_same_in_another_process_with_another_hash_seed():
    code = ("from ablation.grid import load_sweep;"
            f"print('\\n'.join(t.key for t in load_sweep({str(SWEEPS / 'cifar10_linf.yaml')!r})"
            ".trials))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "4321"}, check=True).stdout.split()
    assert other == [t.key for t in load_sweep(SWEEPS / "cifar10_linf.yaml").trials]


def test_all_subsets_are_the_papers_fifteen_in_figure_order():
    assert ALL_SUBSETS == ((1,), (2,), (3,), (4,), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4),
                           (1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4), (1, 2, 3, 4))


def test_preact_sweep_order_layers_and_baselines():
    sweep = load_sweep(SWEEPS / "cifar10_linf.yaml")
    grid, baselines = sweep.trials[:45], sweep.trials[45:]
    for i, intervention in enumerate(("fix_param", "fix_lr", "awp")):
        block = grid[15 * i:15 * (i + 1)]
        assert {t.intervention for t in block} == {intervention}
        assert tuple(t.layers for t in block) == ALL_SUBSETS
    assert [(t.intervention, t.layers) for t in baselines] == [("none", ()), ("awp_full", ())]
    for t in sweep.trials:  # base and paper defaults reach every trial
        assert (t.model, t.method, t.epochs, t.dataset, t.threat, t.seed) == (
            "preact18", "at", 200, "cifar10", "linf", 0)
        assert (t.data_root, t.download) == ("data", False)


def test_baselines_appear_once_per_combination_of_the_other_axes():
    sweep = sweep_from_dict({
        "name": "x", "base": {"epochs": 3},
        "grid": {"dataset": ["cifar10", "svhn"], "threat": ["linf", "l2"],
                 "intervention": ["awp", "none"], "layers": [[3, 4], [4]], "seed": [0, 1]},
        "baselines": {"AT": {"intervention": "none", "epochs": 5},
                      "AWP": {"intervention": "awp_full"}}}, source="x.yaml")
    # Grid: 2 x 2 x (awp x 2 subsets + none once) x 2 seeds = 24; baselines: 2 x 8 combinations.
    assert len(sweep.trials) == 24 + 16
    grid, baselines = sweep.trials[:24], sweep.trials[24:]
    assert [(t.intervention, t.layers, t.seed) for t in grid[:6]] == [
        ("awp", (3, 4), 0), ("awp", (3, 4), 1), ("awp", (4,), 0), ("awp", (4,), 1),
        ("none", (), 0), ("none", (), 1)]
    combos = [(t.dataset, t.threat, t.seed) for t in baselines[::2]]
    assert len(set(combos)) == len(combos) == 8
    assert [t.intervention for t in baselines[:2]] == ["none", "awp_full"]
    assert all(t.layers == () for t in baselines)
    assert [t.epochs for t in baselines[:2]] == [5, 3]  # baseline fields beat base


def test_overrides_win_and_svhn_files_spell_out_the_defaults():
    sweep = load_sweep(SWEEPS / "svhn_linf.yaml")
    for t in sweep.trials:
        assert (t.lr_max, t.step, t.awp_warmup, t.model, t.epochs) == (
            0.01, 1 / 255, 5, "preact18", 200)
        # Written out only to document them: the same config (and key) as the defaults give.
        plain = from_dict({"dataset": "svhn", "model": "preact18", "intervention": t.intervention,
                           "layers": list(t.layers), "precision": "tf32"})
        assert plain.key == t.key
    l2 = load_sweep(SWEEPS / "svhn_l2.yaml").trials[0]
    assert (l2.lr_max, l2.step, l2.awp_warmup) == (0.01, 15 / 255, 0)
    mixed = sweep_from_dict({
        "name": "x", "base": {"lr_max": 0.2},
        "grid": {"dataset": ["cifar10", "svhn"], "lr_max": [0.3]},
        "baselines": {"B": {"lr_max": 0.4, "seed": 1}},
        "overrides": {"svhn": {"lr_max": 0.05, "step": "1/255"}}}, source="x.yaml")
    assert [(t.dataset, t.lr_max, t.seed) for t in mixed.trials] == [
        ("cifar10", 0.3, 0), ("svhn", 0.05, 0), ("cifar10", 0.4, 1), ("svhn", 0.05, 1)]
    assert mixed.trials[1].step == 1 / 255


def test_table_sweeps_hold_the_papers_rows():
    wrn = load_sweep(SWEEPS / "wrn34_cifar10_linf.yaml")
    assert wrn.autoattack == 0 and {t.model for t in wrn.trials} == {"wrn34_10"}
    rows = {(t.intervention, t.layers) for t in wrn.trials}
    assert rows == {("fix_lr", (3, 4)), ("awp", (3, 4)), ("none", ()), ("awp_full", ())}
    assert sorted({t.seed for t in wrn.trials}) == [0, 1, 2, 3, 4]
    trades = load_sweep(SWEEPS / "trades_cifar10_linf.yaml")
    assert trades.autoattack == 0 and {t.method for t in trades.trials} == {"trades"}
    table5 = {(4,), (3, 4), (2, 3, 4), (1, 2, 3, 4)}
    assert table5 <= {t.layers for t in trades.trials if t.intervention == "awp"}
    archs = load_sweep(SWEEPS / "architectures_linf.yaml")
    assert [t.model for t in archs.trials[::15][:4]] == ["preact34", "vgg16", "dpn26", "dla"]
    assert {t.intervention for t in archs.trials} == {"awp", "none", "awp_full"}
    assert load_sweep(SWEEPS / "cifar10_linf.yaml").autoattack is None


def test_demo_is_small_and_says_it_demonstrates_only():
    demo = load_sweep(SWEEPS / "demo_digits.yaml")
    assert {(t.dataset, t.model, t.device, t.epochs) for t in demo.trials} == {
        ("digits", "preact_small", "cpu", 8)}
    assert [(t.intervention, t.layers) for t in demo.trials] == [
        ("fix_lr", (3, 4)), ("fix_lr", (1, 2)), ("fix_lr", (1, 2, 3, 4)), ("awp", (3, 4)),
        ("awp", (1, 2)), ("awp", (1, 2, 3, 4)), ("none", ()), ("awp_full", ())]
    text = " ".join(demo.description.split())
    assert "demo only" in text and "does not reproduce robust overfitting" in text
    assert "no finding" in text


GOOD = """\
name: bad
base: {epochs: 2}
grid:
  intervention: [awp]
  layers: [[3, 4]]
  seed: [0]
"""


@pytest.mark.parametrize("text, expected", [
    (GOOD + "extra: 1\n", "unknown top-level key 'extra'"),
    (GOOD.replace("seed:", "sed:"), "grid: key 'sed' is not a trial field"),
    (GOOD.replace("seed: [0]", "seed: []"), "grid: key 'seed' is an empty list"),
    (GOOD.replace("seed: [0]", "seed: 0"), "grid: key 'seed' must be a list"),
    (GOOD.replace("[[3, 4]]", "[[5]]"), "grid: key 'layers': [5] is not a non-empty subset"),
    (GOOD.replace("[[3, 4]]", "[[]]"), "grid: key 'layers': [] is not a non-empty subset"),
    (GOOD.replace("[[3, 4]]", "[3, 4]"), "grid: key 'layers' must be 'all' or a list of subsets"),
    (GOOD.replace("[[3, 4]]", "al"), "grid: key 'layers' must be 'all'"),
    (GOOD.replace("[[3, 4]]", "[[3, 4], [4, 3]]"),
     "trials 1 and 2 have the same key cifar10-linf-preact18-at-awp-34-s0-"),
    (GOOD.replace("seed: [0]", "seed: [0, 0]"), "trials 1 and 2 have the same key"),
    (GOOD + "overrides: {svhn: {lr_max: 0.01}}\n", "overrides: key 'svhn' is not the dataset"),
    (GOOD.replace("name: bad\n", ""), "key 'name' is missing"),
    (GOOD.replace("name: bad", "name: Bad-Name"), "key 'name': 'Bad-Name' must use only"),
    (GOOD.replace("  layers: [[3, 4]]\n", ""), "the grid has no 'layers' axis"),
    (GOOD.replace("[awp]", "[none]"), "key 'layers' is given but no trial's intervention"),
    (GOOD + "baselines: {AT: none}\n", "baselines: key 'AT' must be a mapping"),
    (GOOD + "baselines: {AT: {intervention: none, epoch: 3}}\n",
     "baselines: AT: unknown key 'epoch'"),
    (GOOD.replace("epochs: 2", "epochs: -1"), "key 'epochs': must be > 0, got -1"),
    (GOOD + "autoattack: -1\n", "key 'autoattack': -1 must be an integer >= 0"),
    ("name: bad\ngrid: {}\n", "the sweep has no trials"),
    (GOOD.replace("epochs: 2", "dataset: [svhn]"), "key 'dataset' must be a string"),
    ("name: bad\ngrid: [\n", "not valid YAML"),
])
def test_bad_sweeps_fail_with_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    assert expected in message, message


def test_a_sweep_alias_bomb_and_huge_values_give_one_short_line(tmp_path):
    rows = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 6)]
    path = tmp_path / "sweep.yaml"
    path.write_text("name: bomb\ndescription: [" + ", ".join(rows) + "]\n")
    with pytest.raises(ConfigError, match="expand to more than 100,000 values"):
        load_sweep(path)  # 9^6 strings here; 9^9 took hours to print
    huge = [["x" * 100] * 100] * 10
    for raw in ({"name": "x" * 10**5}, {"name": "b", "description": huge},
                {"name": "b", "grid": {"seed": huge[0][0]}}, {"name": "b", "grid": huge[0][0]},
                {"name": "b", "grid": {"layers": huge}}, {"name": "b", "baselines": {"AT": huge}},
                {"name": "b", "base": {"epochs": huge}}):
        with pytest.raises(ConfigError) as err:
            sweep_from_dict(raw, source="s.yaml")
        assert len(str(err.value)) < 200, str(err.value)[:300]


def test_a_sweep_of_baselines_only_runs_each_baseline_once():
    raw = yaml.safe_load("name: b\nbaselines: {AT: {}, AWP: {intervention: awp_full}}")
    sweep = sweep_from_dict(raw, source="b.yaml")
    assert [t.intervention for t in sweep.trials] == ["none", "awp_full"]
    assert sweep.path == Path("b.yaml") and sweep.autoattack is None and sweep.description == ""


def test_table_sweeps_are_the_grid_sweeps_table_rows_over_five_seeds():
    """The 5-seed table sweeps run the same trials (same keys, so the same constants) as the
    one-seed sweeps of each setting, for the paper's table rows only."""
    def keys(name, seed=None):
        return {t.key for t in load_sweep(SWEEPS / f"{name}.yaml").trials
                if seed is None or t.seed == seed}

    rows = {("fix_lr", (3, 4)), ("awp", (3, 4)), ("none", ()), ("awp_full", ())}
    for name in TABLE_SWEEPS:
        sweep = load_sweep(SWEEPS / f"{name}.yaml")
        assert {(t.intervention, t.layers) for t in sweep.trials} == rows
        assert sweep.autoattack == 0 and {t.seed for t in sweep.trials} == {0, 1, 2, 3, 4}
        if name.endswith("preact18"):
            dataset = sweep.trials[0].dataset
            assert keys(name, seed=0) <= keys(f"{dataset}_linf") | keys(f"{dataset}_l2")
    linf = {t.key for t in load_sweep(SWEEPS / "tables/table1_cifar10_wrn34.yaml").trials
            if t.threat == "linf"}
    assert linf == keys("wrn34_cifar10_linf")
    trades = load_sweep(SWEEPS / "tables/table4_5_trades.yaml")
    assert {(t.intervention, t.layers) for t in trades.trials} == {
        ("none", ()), ("awp_full", ()), ("awp", (4,)), ("awp", (3, 4)), ("awp", (2, 3, 4)),
        ("awp", (1, 2, 3, 4))}
    assert keys("tables/table4_5_trades", seed=0) <= keys("trades_cifar10_linf")
