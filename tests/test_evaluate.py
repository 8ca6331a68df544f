"""AutoAttack wrapper on models whose robust accuracy is known without running it."""

import torch
from torch import nn

from ablation.attacks import ThreatModel, autoattack_accuracy


class Constant(nn.Module):
    """Ignores its input: no attack can change its prediction (always class 3)."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.eye(10)[3])

    def forward(self, x):  # the 0 * x term keeps a (zero) input gradient for the attacks
        return self.logits.expand(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_an_input_independent_model_keeps_its_clean_accuracy():
    y = torch.tensor([3, 3, 1, 3, 0, 3, 2, 3])
    x = torch.rand(8, 1, 4, 4)
    acc = autoattack_accuracy(Constant(), x, y, ThreatModel("linf", 8 / 255, 2 / 255))
    assert acc == 5 / 8


def test_a_linear_model_falls_to_a_large_eps_and_the_cap_is_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x = torch.rand(12, 1, 4, 4)
    y = model(x).argmax(1)  # clean accuracy 1 by construction
    assert autoattack_accuracy(model, x, y, ThreatModel("l2", 4.0, 0.1), n_examples=6) == 0.0
    assert model.training  # mode restored after the eval-mode attack


def test_a_summary_records_what_the_trial_ran_on(tmp_path):
    from conftest import tiny_trial

    import ablation
    from ablation.config import from_dict
    from ablation.evaluate import write_summary
    from ablation.trainer import Trainer

    config = from_dict(tiny_trial(epochs=1))
    trainer = Trainer(config, tmp_path)
    summary = write_summary(config, tmp_path, trainer.fit())
    assert summary["ablate_version"] == ablation.__version__ != "0+unknown"
    assert summary["torch_version"] == torch.__version__ and summary["device_name"] == "cpu"
    assert "git_commit" in summary
