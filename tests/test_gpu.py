"""The CUDA paths that no CPU can show: each test runs on a real GPU and is skipped without one.

Run by the GPU check (``python scripts/gpu_check.py``) as ``pytest -m gpu``. Each test names the
defect it guards against; the CPU half of each fix is tested beside the code it changes.
"""

import math

import pytest
import torch
from conftest import StopAfter, cifar_shaped, tiny_trial

from ablation.config import from_dict
from ablation.datasets import dataset_info
from ablation.device import eval_bytes_per_image, eval_batch_size, resolve_device
from ablation.errors import ConfigError
from ablation.models import build_trial_model
from ablation.trainer import Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_fused_sgd_resumes_a_checkpoint_of_the_other_layout(tmp_path, first, then):
    cfg = from_dict(tiny_trial(epochs=2, device="cuda", intervention="fix_lr", layers=[3, 4]))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg.replace(channels_last=first), tmp_path).fit(StopAfter(1))
    resumed = Trainer(cfg.replace(channels_last=then), tmp_path)
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    history = resumed.fit()  # fused SGD refused the other strides before 0.3
    assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])


def test_a_gpu_that_is_not_there_is_one_line():
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"sees {count} GPU"):
        resolve_device(f"cuda:{count}")


def test_the_checkpoint_holds_the_trial_devices_generator_and_old_lists_resume(tmp_path):
    cfg = from_dict(tiny_trial(epochs=2, device="cuda"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path).fit(StopAfter(1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    own = state["rng"]["cuda"]
    assert torch.is_tensor(own)
    state["rng"]["cuda"] = [own] * 8  # as a 0.2 trial that saw eight GPUs wrote it
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = Trainer(cfg, tmp_path)
    assert torch.equal(torch.cuda.get_rng_state(resumed.device), own)
    assert len(resumed.fit()) == 2


def test_bf16_is_refused_in_one_line_below_compute_capability_8(tmp_path):
    cfg = from_dict(tiny_trial(epochs=1, device="cuda", precision="bf16"))
    if torch.cuda.get_device_capability() >= (8, 0):
        assert len(Trainer(cfg, tmp_path).fit()) == 1
    else:
        with pytest.raises(ConfigError, match="bf16 needs a GPU of compute capability 8.0"):
            Trainer(cfg, tmp_path)


def test_the_eval_memory_probe_is_within_a_factor_two_of_the_measured_peak():
    device = torch.device("cuda")
    model = build_trial_model(from_dict({"model": "preact18"}), dataset_info("cifar10"))
    model = model.to(device).eval()
    image = torch.rand(3, 32, 32, device=device)
    from ablation.attacks import ThreatModel, pgd

    peaks = {}
    for batch in (64, 256):
        x = image.expand(batch, 3, 32, 32).clone()
        y = torch.zeros(batch, dtype=torch.long, device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        pgd(model, x, y, ThreatModel("linf", 8 / 255, 2 / 255), 2)
        torch.cuda.synchronize()
        peaks[batch] = torch.cuda.max_memory_allocated() - base
    measured = (peaks[256] - peaks[64]) / 192
    estimate = eval_bytes_per_image(model, image)
    assert measured / 2 <= estimate <= measured * 2, (estimate, measured)
    assert 32 <= eval_batch_size(model, image, device) <= 4096


def test_an_evaluation_that_runs_out_of_memory_halves_its_batch(tmp_path):
    data = cifar_shaped(4096)
    cfg = from_dict(tiny_trial(epochs=1, device="cuda", dataset="cifar10", model="preact18",
                               test_batch_size=4096, train_eval_size=0))
    trainer = Trainer(cfg, tmp_path, data=data)
    free, _ = torch.cuda.mem_get_info()
    blocker = torch.empty(max(0, free - 3 * 2**30), dtype=torch.uint8, device="cuda")
    try:
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="ran out of GPU memory"):
            got = trainer.attack_metrics(trainer.data.test_x, trainer.data.test_y, 2)
    finally:
        del blocker
        torch.cuda.empty_cache()
    assert trainer.eval_batch < 4096
    small = trainer.eval_batch
    torch.manual_seed(0)
    want = trainer.attack_metrics(trainer.data.test_x, trainer.data.test_y, 2)
    assert trainer.eval_batch == small
    # The random starts are drawn for the whole set first: only the rounding of other batch
    # sizes' kernels differs.
    assert got == pytest.approx(want, abs=2e-3)


def test_a_compiled_trial_attacks_without_weight_gradients(tmp_path):
    cfg = from_dict(tiny_trial(epochs=1, device="cuda", compile=True))
    trainer = Trainer(cfg, tmp_path)
    history = trainer.fit()
    assert math.isfinite(history[0]["test_robust_loss"])
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_autoattack_after_training_runs_with_the_trainer_released(tmp_path):
    from ablation.local import train_trial

    cfg = from_dict(tiny_trial(epochs=1, device="cuda"))
    train_trial(cfg, tmp_path, autoattack=32, threads=1, quiet=True, autoattack_batch=16)
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["autoattack_n"] == 32 and 0 <= summary["best_autoattack_acc"] <= 1
    assert torch.backends.cudnn.benchmark is False  # AutoAttack's batches shrink


def test_a_pack_on_the_gpu_equals_each_trial_alone_in_float64(tmp_path):
    from ablation.packed import PackTrainer

    base = tiny_trial(epochs=2, device="cuda", precision="fp64", milestones=[0.25, 0.75],
                      awp_warmup=1)
    ivs = [{}, {"intervention": "fix_lr", "layers": [3, 4]},
           {"intervention": "fix_param", "layers": [1, 2]},
           {"intervention": "awp", "layers": [2, 3]}]
    configs = [from_dict({**base, **iv}) for iv in ivs]
    pack = PackTrainer(configs, [tmp_path / f"p{i}" for i in range(len(configs))])
    histories, failed = pack.fit()
    assert not failed
    for k, config in enumerate(configs):
        lone = Trainer(config, tmp_path / f"a{k}")
        history = lone.fit()
        for name, w in lone.model.state_dict().items():
            # cuDNN's kernels sum in their own orders (atomics too): rounding, not bits
            torch.testing.assert_close(pack.model.state_dict(k)[name], w, rtol=1e-8, atol=1e-10)
        assert histories[config.key][-1]["test_robust_acc"] == pytest.approx(
            history[-1]["test_robust_acc"], abs=1e-6)
