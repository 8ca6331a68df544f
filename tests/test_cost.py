"""What a sweep will cost before it starts (ablation/cost.py): GPU-hours from forward passes
counted by hand, forked epochs skipped, a measured rate; ``ablate run --dry-run``'s plan."""

import json

import pytest
from conftest import ablate, write_sweep

from ablation.config import TrialConfig
from ablation.cost import default_rate, gpu_hours, pack_speedups, passes_per_epoch, rate_from_bench
from ablation.errors import ConfigError
from ablation.fork import Fork
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
