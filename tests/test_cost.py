"""What a sweep will cost before it starts (ablation/cost.py): GPU-hours from forward passes
counted by hand, forked epochs skipped, a measured rate; ``ablate run --dry-run``'s plan."""

import json
from pathlib import Path

import pytest
from conftest import ablate, run_sweep_in_process, tiny_trial, write_fake_dataset, write_sweep

from ablation.config import TrialConfig
from ablation.cost import (autoattack_hours, default_rate, disk_bytes, dry_run_lines,
                           forward_flops, gpu_hours, makespan, pack_speedups, passes_per_epoch,
                           rate_from_bench, scaled_rate)
from ablation.errors import ConfigError
from ablation.fork import Fork, plan_forks
from ablation.grid import load_sweep


def test_gpu_hours_count_forward_passes_and_skip_forked_epochs(tmp_path):
    reference = TrialConfig()  # PreAct-18, CIFAR-10, PGD-10 AT, train-mode attack, 10k+10k eval
    # by hand: 50,000 x (10 steps x 2F + restart forward 1F + step 3F + logging 1F)
    #          + 10,000 x (10 x 2F + 2F) + 10,000 x (20 x 2F + 2F)
    assert passes_per_epoch(reference) == 50_000 * 25 + 10_000 * 22 + 10_000 * 42
    rate = default_rate()
    assert gpu_hours([reference], {}, rate) == pytest.approx(200 * 36 / 3600)  # the measurement
    fix_lr = reference.replace(intervention="fix_lr", layers=[3, 4])
    both = gpu_hours([reference, fix_lr], {fix_lr.key: Fork(reference.key, 99)}, rate)
    assert both == pytest.approx((200 + 101) * 36 / 3600)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({
        "environment": {"device_name": "NVIDIA H100"}, "options": {"precision": "bf16"},
        "interventions": [{"intervention": "none", "flops_per_step": 4e12,
                           "project": {"median_s": 0.1}}]}))
    measured = rate_from_bench(bench)
    assert measured.flops_per_s == pytest.approx(4e13) and "NVIDIA H100 bf16" in measured.source


def bench_file(tmp_path, flops=4e12, seconds=0.1, packs=None):
    report = {"environment": {"device_name": "NVIDIA H100"}, "options": {"precision": "bf16"},
              "interventions": [{"intervention": "none", "flops_per_step": flops,
                                 "project": {"median_s": seconds}}]}
    if packs is not None:
        report["packs"] = packs
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize("fields,needle", [
    ({"seconds": -0.1}, "median seconds per step is -0.1"),
    ({"seconds": float("nan")}, "median seconds per step is nan"),
    ({"seconds": float("inf")}, "median seconds per step is inf"),
    ({"seconds": 0}, "median seconds per step is 0"),
    ({"flops": "4e12"}, "flops_per_step is '4e12'"),
    ({"flops": True}, "flops_per_step is True"),
    ({"packs": [{"k": 1, "images_per_s": 100.0}, {"k": 2, "images_per_s": -5.0}]},
     "the images/s of the pack of 2 is -5.0"),
])
def test_an_impossible_measurement_in_a_bench_file_is_refused_by_name(tmp_path, fields, needle):
    # An 82-hour sweep once priced at "under 0.1 GPU-hours" from a negative time.
    path = bench_file(tmp_path, **fields)
    with pytest.raises(ConfigError, match="--bench .*bench.json: ") as err:
        rate_from_bench(path)
        pack_speedups(path)
    assert needle in str(err.value) and "finite number above zero" in str(err.value)


@pytest.mark.parametrize("content,needle", [(b"\x89PNG\r\n\x1a\n\x00\xff", "UnicodeDecodeError"),
                                            (b"[1, 2]", "a JSON list, not an object"),
                                            (b"flops: 4e12", "JSONDecodeError")])
def test_a_bench_file_that_is_not_a_report_is_one_line(tmp_path, content, needle):
    path = tmp_path / "bench.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not an `ablate bench --json` file") as err:
        rate_from_bench(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_dry_run_lists_keys_and_total_epochs(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=5)
    done = ablate("run", sweep, "--dry-run")
    assert done.returncode == 0
    for key in load_sweep(sweep).by_key:
        assert key in done.stdout
    # AT and fix_lr share epochs 0 and 1 (the LR drops at t = 2.5, in epoch 2)
    assert "2 trials, 10 epochs in total; 8 to train with 1 trials forked" in done.stdout
    assert "the first 2 from synthetic-linf-preact_small-at-none" in done.stdout
    assert "GPU-hours on one NVIDIA H200" in done.stdout
    plain = ablate("run", sweep, "--dry-run", "--no-fork")
    assert "10 epochs in total; 10 to train (no trial forks)" in plain.stdout
    alone = ablate("run", sweep, "--bench", sweep)
    assert alone.returncode == 2 and "use it with --dry-run" in alone.stderr
    assert not (tmp_path / "runs").exists()


def test_makespan_is_a_list_schedule_that_waits_for_the_fork_epoch():
    # A baseline of 10 epochs (10 h), a trial forked from it after 4 epochs (its last 6: 6 h) and
    # an unrelated trial (3 h). On 2 GPUs: the baseline and the 3-h trial start at 0; the forked
    # trial may start when the baseline reaches epoch 4, at 4 h, and ends at 10 h. On 1 GPU the
    # three run one after another: 19 h. On 3 GPUs the forked trial still waits: 10 h.
    base = TrialConfig(dataset="synthetic", epochs=10)
    forked = base.replace(intervention="fix_lr", layers=[3, 4])
    other = base.replace(seed=1)
    by_key = {t.key: t for t in (base, forked, other)}
    forks = {forked.key: Fork(base.key, 4)}
    packs = [[base.key], [forked.key], [other.key]]
    assert makespan(packs, by_key, forks, [10, 6, 3], 1) == pytest.approx(19)
    assert makespan(packs, by_key, forks, [10, 6, 3], 2) == pytest.approx(10)
    assert makespan(packs, by_key, forks, [10, 6, 3], 3) == pytest.approx(10)
    # A longer forked trial (12 h) on 2 GPUs: it starts at 4 h and ends at 16 h.
    assert makespan(packs, by_key, forks, [10, 12, 3], 2) == pytest.approx(16)


def test_autoattack_hours_count_its_four_attacks_per_image():
    # By hand: a clean forward and 100 APGD-CE steps (2F each) on every image; on the half still
    # robust, APGD-T and FAB-T (9 targets x 100 steps x 2F) and Square (5,000 forwards); on the
    # best and the last weights.
    reference, rate = TrialConfig(), default_rate()
    per_image = 1 + 200 + 0.5 * (1800 + 1800 + 5000)
    seconds = 2 * 10_000 * per_image * forward_flops(reference) / rate.flops_per_s
    assert autoattack_hours(reference, None, rate) == pytest.approx(seconds / 3600)
    assert autoattack_hours(reference, 1000, rate) == pytest.approx(seconds / 3600 / 10)
    # The H200's own epoch is 36 s, so its per-image pass rate follows from the training count.
    per_pass = 36 / passes_per_epoch(reference)
    assert autoattack_hours(reference, 0, rate) == pytest.approx(
        2 * 10_000 * per_image * per_pass / 3600)


def test_a_card_is_priced_at_its_datasheet_ratio_to_the_h200():
    h200 = default_rate().flops_per_s
    assert scaled_rate("h200").flops_per_s == pytest.approx(h200)
    assert scaled_rate("A10G").flops_per_s == pytest.approx(h200 * 62.5 / 494.5)
    assert "not a measurement" in scaled_rate("a100").source
    with pytest.raises(ConfigError, match="--gpu 'tpu' is unknown; choose from h200, "):
        scaled_rate("tpu")


def test_disk_estimate_matches_the_files_a_run_writes(tmp_path):
    # A 16-wide network, so that the weights dominate each file (the history and RNG states
    # are a few KB); the fix-lr trial forks from AT, so AT writes a fork file.
    from ablation.grid import sweep_from_dict

    raw = {"name": "disk", "base": tiny_trial(epochs=4, width=16, train_steps=1, test_steps=1,
                                             train_eval_size=32),
           "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
           "baselines": {"AT": {"intervention": "none"}}}
    run = run_sweep_in_process(raw, tmp_path / "disk", fork=True)
    sweep = sweep_from_dict(raw)
    forks = plan_forks(sweep.trials)
    assert len(forks) == 1
    estimate = disk_bytes(sweep, forks)
    files = {kind: sum(p.stat().st_size for p in run.glob(f"trials/*/{pattern}"))
             for kind, pattern in (("checkpoints", "checkpoint.pt"), ("best", "best-*.pt"),
                                   ("forks", "fork-*.pt"))}
    assert estimate["fork_files"] == 1
    for kind, size in files.items():
        assert estimate[kind] <= size <= 1.02 * estimate[kind] + 64_000, (kind, size, estimate)
    assert sum(p.stat().st_size for p in run.glob("curves/*.parquet")) <= estimate["curves"]


def test_dry_run_says_data_autoattack_wall_clock_disk_seeds_and_other_cards(tmp_path):
    write_sweep(tmp_path / "s.yaml", epochs=5)
    text = (tmp_path / "s.yaml").read_text().replace("dataset: synthetic", "dataset: cifar10")
    cifar = tmp_path / "c.yaml"
    cifar.write_text(text)
    done = ablate("run", cifar, "--dry-run", "--gpus", "2", "--gpu", "a10g",
                  "--set", "data_root=nowhere")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    said = {line.split(":")[0]: line for line in lines if ":" in line.split(" ")[0]}
    nowhere = tmp_path / "nowhere"
    assert said["data"].startswith(f"data: cifar10 is not in {Path.cwd() / 'nowhere'}")
    assert "`ablate data cifar10 --root nowhere`" in said["data"] and not nowhere.exists()
    assert "GPU-hours on one NVIDIA A10G, scaled from the H200" in done.stdout
    assert "`ablate evaluate` on the tables' 2 rows" in said["AutoAttack"]
    assert "50% of the images still robust" in said["AutoAttack"]
    assert said["seeds"].startswith("seeds: 1 per setting; the paper's Tables 1-5 average 5 runs")
    assert said["disk"].startswith("disk: about ") and "1 fork file" in said["disk"]
    hours = [line for line in lines if " h on 2 GPUs (wall-clock" in line]
    assert len(hours) == 1
    # in process: with the data there, and a sweep that runs AutoAttack on 100 images
    data = tmp_path / "data"
    write_fake_dataset("cifar10", data, n_train=10, n_test=10)
    cifar.write_text(text.replace("name: tiny", "name: tiny\nautoattack: 100"))
    sweep = load_sweep(cifar, {"data_root": str(data)})
    lines = dry_run_lines(sweep, plan_forks(sweep.trials))
    assert f"data: cifar10 in {data}" in lines
    assert any(line.startswith("AutoAttack (autoattack: 100) on every trial's best and last "
                               "weights, 100 test images") for line in lines)
    assert any(" h on 1 GPU (wall-clock" in line for line in lines)


def test_run_set_applies_to_every_trial_and_a_runtime_field_keeps_the_keys(tmp_path):
    from ablation.config import RUNTIME_FIELDS

    path = write_sweep(tmp_path / "s.yaml", epochs=5)
    plain = load_sweep(path)
    moved = load_sweep(path, {"data_root": "/nfs/data", "device": "cuda"})
    assert {"data_root", "device"} <= set(RUNTIME_FIELDS)
    assert list(moved.by_key) == list(plain.by_key)
    assert {(t.data_root, t.device) for t in moved.trials} == {("/nfs/data", "cuda")}
    longer = load_sweep(path, {"epochs": 7})
    assert {t.epochs for t in longer.trials} == {7}
    assert not set(longer.by_key) & set(plain.by_key)  # an identifying field: new keys
    # A folder started without --set resumes with the runtime --set and refuses the other.
    from ablation.store import RunDir, plan

    folder = RunDir.attach(tmp_path / "run")
    assert set(plan(folder, plain, False)) == set(plain.by_key)
    assert set(plan(folder, moved, False)) == set(plain.by_key)
    with pytest.raises(ConfigError, match=r"changed 2 trial\(s\) already in .*or the --set"):
        plan(folder, longer, False)
    for option, needle in ((["--set", "epochs=abc"], "with --set epochs: key 'epochs' must be an "
                                                     "integer, got 'abc'"),
                           (["--set", "epoch=3"], "--set: unknown key 'epoch'"),
                           (["--set", "epochs"], "--set 'epochs': expected KEY=VALUE"),
                           (["--gpus", "2"], "--gpus estimates the cost of a sweep")):
        done = ablate("run", path, *option)
        assert done.returncode == 2 and needle in done.stderr and done.stderr.count("\n") == 1, \
            done.stderr
