"""``ablate bench``: the Rice reference step, the timing summary, and the command end to end."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from ablation.bench import (BenchOptions, RiceStep, compare, peak_flops, project_step,
                            random_data, reference_for, timing_stats, trial_config)
from ablation.cli import cli, main
from ablation.errors import ConfigError
from ablation.trainer import Trainer

CPU = torch.device("cpu")
TINY = BenchOptions(model="preact_small", width=4, batch_size=8, train_steps=2, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bn_counts(model):
    return [m.num_batches_tracked.item() for m in model.modules()
            if isinstance(m, torch.nn.BatchNorm2d)]


def test_reference_step_runs_rices_train_mode_forwards_and_fills_weight_grads():
    config = trial_config(TINY, "none", CPU)
    reference = reference_for(config, CPU)
    data = random_data(8, 0, seed=0, device=CPU)
    x, y = data.train_x.float() / 255, data.train_y
    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    reference.model.train()
    reference.attack(x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in reference.model.parameters()), "loss.backward() in the attack fills grads"
    reference.model.load_state_dict(before)
    reference.step(x, y)
    # K attack forwards, the restart-comparison forward, the training forward and the logging
    # forward, all in train mode: K + 3 updates of every BN layer's running statistics.
    k = config.train_steps
    assert set(bn_counts(reference.model)) == {k + 3}
    after = reference.model.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n, _ in reference.model.named_parameters())
    assert reference.sums[0] > 0 and 0 <= reference.sums[1] <= 8 and reference.sums[2] > 0


def test_reference_step_computes_the_projects_at_update(tmp_path):
    """Same weights and RNG in: the project's step (AT, no intervention, fp32) and the reference
    give the same weights and BN statistics out; only their cost differs."""
    config = trial_config(TINY, "none", CPU)
    data = random_data(8, 8, seed=1, device=CPU)
    trainer = Trainer(config, tmp_path, data=data)
    reference = RiceStep(reference_for(config, CPU).model, config.eps, config.step,
                         config.train_steps, config.lr_max)
    reference.model.load_state_dict(trainer.model.state_dict())
    x, y = data.train_x.float() / 255, data.train_y
    torch.manual_seed(7)
    trainer.train_step(0, x, y)
    torch.manual_seed(7)
    reference.step(x, y)
    ours, theirs = trainer.model.state_dict(), reference.model.state_dict()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert set(bn_counts(trainer.model)) == {config.train_steps + 3}


def test_compare_gives_min_median_images_per_second_and_project_over_reference():
    project = [0.30, 0.10, 0.20, 0.50]  # seconds per batch, one per repeat
    reference = [0.40, 0.60, 0.30]
    out = compare(project, reference, batch_size=64)
    assert out["project"]["min_s"] == 0.10 and out["project"]["median_s"] == pytest.approx(0.25)
    assert out["reference"]["min_s"] == 0.30 and out["reference"]["median_s"] == 0.40
    assert out["project"]["images_per_s"] == pytest.approx(64 / 0.25)
    assert out["project"]["images_per_s_best"] == pytest.approx(640)
    assert out["ratio_median"] == pytest.approx(0.40 / 0.25)  # 1.6x: the project is faster
    assert out["ratio_min"] == pytest.approx(3.0)
    assert out["ratio_median"] == pytest.approx(
        out["project"]["images_per_s"] / out["reference"]["images_per_s"])
    assert timing_stats([2.0], 4)["seconds_per_batch"] == [2.0]


def test_peak_table_matches_device_names_and_says_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_project_step_trains_the_trainers_model(tmp_path):
    config = trial_config(TINY, "awp", CPU)
    data = random_data(8, 8, seed=0, device=CPU)
    trainer = Trainer(config, tmp_path, data=data)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    project_step(trainer)(data.train_x, data.train_y)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_bench_command_writes_json_with_positive_numbers(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "preact_small", "--width", "4", "--batch-size", "8",
            "--batches", "2", "--repeats", "2", "--warmup", "1", "--train-steps", "1",
            "--intervention", "none", "--intervention", "fix_lr", "--layers", "4",
            "--device", "cpu", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "ratio (median)" in result.output and "per-epoch split" in result.output
    report = json.loads(out.read_text())
    assert {"environment", "options", "reference", "interventions", "split", "trials_per_gpu",
            "notes"} <= set(report)
    assert report["environment"]["threads"] == 1 and report["trials_per_gpu"] is None
    assert [r["intervention"] for r in report["interventions"]] == ["none", "fix_lr"]
    assert report["interventions"][1]["layers"] == [4]
    for row in report["interventions"]:
        for loop in ("project", "reference"):
            assert len(row[loop]["seconds_per_batch"]) == 2
            assert row[loop]["images_per_s"] > 0 and row[loop]["min_s"] > 0
        assert row["ratio_median"] == pytest.approx(
            row["reference"]["median_s"] / row["project"]["median_s"])
        assert row["flops_per_step"] > 0 and row["peak_memory_bytes"] is None
    assert report["reference"]["flops_per_step"] > report["interventions"][0]["flops_per_step"], \
        "the reference also computes weight gradients in its attack"
    split = report["split"]
    assert set(split["seconds"]) == {"train", "logging_forward", "evaluation", "checkpoint"}
    assert all(v > 0 for k, v in split["seconds"].items() if k != "checkpoint")
    assert split["train_images"] == 16 and split["train_eval_images"] == 3
    assert split["seconds"]["logging_forward"] < split["seconds"]["train"]


def test_device_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--device", "cuda", "--no-split"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --device: 'cuda' asked for, but CUDA is not available here\n"


@pytest.mark.parametrize("args, message", [
    (["--intervention", "awp_half"], "'--intervention': 'awp_half' is not one of"),
    (["--layers", "3,5"], "--layers '3,5': [3, 5] is not a non-empty subset of [1, 2, 3, 4]"),
    (["--trials-per-gpu", "1,two"], "--trials-per-gpu '1,two': expected comma-separated"),
])
def test_bad_options_are_one_line_errors(capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["bench", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_compile_is_a_variant_of_the_project_step_only(tmp_path):
    # Cheap: nothing is traced before the first forward, which this test never runs.
    opts = dataclasses.replace(TINY, compile=True)
    config = trial_config(opts, "awp", CPU)
    assert config.compile and config.key == trial_config(TINY, "awp", CPU).key
    trainer = Trainer(config, tmp_path, data=random_data(8, 8, seed=0, device=CPU))
    assert trainer.model._compiled_call_impl is not None, "the project's model is compiled"
    assert reference_for(config, CPU).model._compiled_call_impl is None, "the reference is not"


def test_bench_packs_times_packs_of_k_against_k_separate_steps_and_prices_the_sweep(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "preact_small", "--width", "2", "--batch-size", "8",
            "--batches", "2", "--repeats", "2", "--warmup", "1", "--train-steps", "1",
            "--intervention", "none", "--intervention", "fix_lr", "--device", "cpu",
            "--split-batches", "1", "--pack", "1,2,3", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["packs"]
    assert [r["k"] for r in rows] == [1, 2, 3]
    assert rows[2]["interventions"] == ["none", "fix_lr", "fix_lr"]  # distinct trials
    lone = {r["intervention"]: r["project"]["median_s"] for r in report["interventions"]}
    for row in rows:
        assert row["images_per_s"] == pytest.approx(row["k"] * 8 / row["median_s"])
        assert row["ratio_vs_separate"] == pytest.approx(
            sum(lone[i] for i in row["interventions"]) / row["median_s"])
    assert [s["k"] for s in report["pack_splits"]] == [2, 3]
    assert "per-epoch split of packs" in result.output
    # --dry-run prices packs at the measured speed of K over K separate steps
    from ablation.cost import pack_speedups

    speedups = pack_speedups(out)
    assert speedups[1] == 1.0 and speedups[2] == pytest.approx(
        rows[1]["images_per_s"] / rows[0]["images_per_s"])


def test_bench_packs_it_cannot_fill_are_one_line_before_anything_runs():
    result = CliRunner().invoke(cli, ["bench", "--device", "cpu", "--intervention", "none",
                                      "--pack", "1,2"], standalone_mode=False)
    assert isinstance(result.exception, ConfigError)
    assert "--pack 2: the chosen interventions make 1 distinct trials" in str(result.exception)
