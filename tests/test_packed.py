"""ablation/packed.py: K trials trained as one pack compute what each computes alone; each keeps
its own files, resumes alone or in a pack, and stops alone when its loss diverges."""

import pytest
import torch
from conftest import tiny_trial

from ablation.config import from_dict
from ablation.fork import Fork
from ablation.packed import PackTrainer
from ablation.store import plan_packs
from ablation.trainer import Reporter, Trainer

INTERVENTIONS = [{}, {"intervention": "fix_lr", "layers": [3, 4]},
                 {"intervention": "fix_param", "layers": [1, 2]},
                 {"intervention": "awp", "layers": [2, 3]}, {"intervention": "awp_full"}]
# The schedule drops inside the run (fix-lr acts), AWP is on from epoch 1 (its warm-up acts).
BASE = tiny_trial(epochs=2, precision="fp64", milestones=[0.25, 0.75], awp_warmup=1)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as a sweep's trial runs: two threads on a shared two-core machine
    spin against each other (and the float rounding is one thread's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StopAfter(Reporter):
    def __init__(self, epochs):
        self.epochs = epochs

    def epoch(self, row, checkpoint):
        if row["epoch"] + 1 == self.epochs:
            raise KeyboardInterrupt


def alone(config, folder):
    trainer = Trainer(config, folder)
    return trainer.fit(), trainer.model.state_dict()


def worst(history_a, history_b, weights_a, weights_b):
    """The largest relative difference between two trials' curves and final weights."""
    out = 0.0
    for ra, rb in zip(history_a, history_b, strict=True):
        for column, va in ra.items():
            if column.endswith("_seconds"):
                continue
            vb = rb[column]
            if va == va or vb == vb:  # NaN (lr_fixed without fix-lr) equals NaN
                out = max(out, abs(va - vb) / max(abs(va), 1e-12))
    for name, wa in weights_a.items():
        wb = weights_b[name].double()
        out = max(out, ((wa.double() - wb).abs().max() / wa.double().abs().max().clamp(min=1e-12))
                  .item())
    return out


def pack_vs_alone(tmp_path, base, interventions):
    configs = [from_dict({**base, **iv}) for iv in interventions]
    pack = PackTrainer(configs, [tmp_path / f"p{i}" for i in range(len(configs))])
    histories, failed = pack.fit()
    assert failed == {}
    out = 0.0
    for k, config in enumerate(configs):
        history, weights = alone(config, tmp_path / f"a{k}")
        out = max(out, worst(history, histories[config.key], weights, pack.model.state_dict(k)))
    return out


def test_trials_that_differ_only_in_their_intervention_draw_the_same_random_numbers(tmp_path):
    # The premise of a pack: with one seed, the data order, augmentation and attack starts of
    # every batch are the same draws, so one draw serves K trials.
    states = []
    for iv in (INTERVENTIONS[0], INTERVENTIONS[3]):  # AWP's proxy step draws nothing either
        class Record(Reporter):
            def progress(self, epoch, batch, batches):
                seen.append(torch.get_rng_state())
        seen = []
        Trainer(from_dict({**BASE, **iv, "epochs": 1}), tmp_path / str(len(states))).fit(Record())
        states.append(seen)
    assert all(len(s) == len(states[0]) for s in states)
    assert all(torch.equal(a, b) for s in states[1:] for a, b in zip(states[0], s))


def test_a_pack_of_every_intervention_equals_each_trial_alone_in_float64(tmp_path):
    assert pack_vs_alone(tmp_path, BASE, INTERVENTIONS) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("method,threat", [("at", "linf"), ("at", "l2"), ("trades", "linf"),
                                           ("trades", "l2")])
def test_the_digits_trial_in_a_pack_of_every_intervention_equals_it_alone(tmp_path, method,
                                                                          threat):
    # Two epochs of sweeps/trials/digits_tiny.yaml in float64 (docs/method.md D.3). TRADES-L2
    # runs 4 batches of 1024, as in the golden set: alone, one ulp added to its initial weights
    # grows to 7% of the weights in two epochs of the digits trial (its inner maximisation
    # starts at 0.001 * N(0, 1), where the KL gradient is a difference of nearly equal
    # probabilities, and the step divides by its norm), so no other order of summation can
    # follow it further; AT-L2 and the Linf runs stay at 1e-14 over the two epochs.
    from ablation.config import load_trial
    from pathlib import Path

    digits = load_trial(Path(__file__).parents[1] / "sweeps/trials/digits_tiny.yaml")
    base = {**digits.to_dict(), "intervention": "none", "layers": [], "epochs": 2,
            "milestones": [0.25, 0.75], "precision": "fp64", "method": method, "threat": threat,
            "eps": None, "step": None, "awp_warmup": 1}
    if (method, threat) == ("trades", "l2"):
        base["batch_size"] = 1024
    assert pack_vs_alone(tmp_path, base, INTERVENTIONS) < 1e-10


def test_the_first_steps_in_float32_equal_each_trial_alone_to_rounding(tmp_path):
    base = {**BASE, "precision": "fp32", "epochs": 1, "train_eval_size": 0}
    configs = [from_dict({**base, **iv}) for iv in INTERVENTIONS]
    pack = PackTrainer(configs, [tmp_path / f"p{i}" for i in range(len(configs))])
    x = pack.batch(pack.data.train_x[:64], augmented=False)
    y = pack.data.train_y[:64]
    for k, config in enumerate(configs):
        lone = Trainer(config, tmp_path / f"a{k}")
        for group in lone.optimizer.param_groups:
            group["lr"] = config.lr_max
        torch.manual_seed(3)
        lone.train_step(0, x, y)
        lone.train_step(0, x, y)
        if k == 0:
            pack.optimizer.lr = {n: torch.full((pack.k,), config.lr_max, dtype=torch.float64)
                                 for n in pack.names}
            torch.manual_seed(3)
            pack.train_step(0, x, y)
            pack.train_step(0, x, y)
        mine = pack.model.state_dict(k)
        for name, w in lone.model.state_dict().items():
            torch.testing.assert_close(mine[name], w, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{config.intervention} {n}: {m}")


def test_a_diverging_trial_leaves_its_pack_with_its_message_and_the_others_go_on(tmp_path,
                                                                              monkeypatch):
    # The middle trial's logits turn NaN from epoch 1, batch 3 on (as in test_trainer.py's
    # divergence test); its pack-mates must not notice.
    configs = [from_dict({**BASE, **iv}) for iv in INTERVENTIONS[:3]]
    pack = PackTrainer(configs, [tmp_path / f"p{i}" for i in range(3)])
    loss_fn, calls = pack.method.loss, []

    def poisoned(model, x, x_adv, y):
        loss, logits = loss_fn(model, x, x_adv, y)
        calls.append(1)
        if len(calls) > 8 + 3:  # 8 batches per epoch
            b = len(y) // 3
            logits = logits.clone()
            logits[b:2 * b] = float("nan")
        return loss, logits

    monkeypatch.setattr(pack.method, "loss", poisoned)
    histories, failed = pack.fit()
    assert list(failed) == [configs[1].key]
    assert str(failed[configs[1].key]).startswith(
        f"trial {configs[1].key}: the training loss stopped being finite at epoch 1, batch 3 ")
    saved = torch.load(tmp_path / "p1" / "checkpoint.pt", weights_only=True)
    assert len(saved["history"]) == 1, "nothing of the bad epoch is saved"
    assert [s.config.key for s in pack.slots] == [configs[0].key, configs[2].key]
    for k in (0, 2):
        history, weights = alone(configs[k], tmp_path / f"a{k}")
        got = pack.model.state_dict(pack.configs.index(configs[k]))
        assert worst(history, histories[configs[k].key], weights, got) < 1e-12


@pytest.mark.parametrize("first", ["pack", "alone"])
def test_a_trial_resumes_alone_from_a_pack_and_in_a_pack_from_alone(tmp_path, first):
    base = {**BASE, "epochs": 3}
    configs = [from_dict({**base, **iv}) for iv in INTERVENTIONS[:3]]
    folders = [tmp_path / f"t{i}" for i in range(3)]
    if first == "pack":  # all three stop after epoch 1; then each goes on alone
        with pytest.raises(KeyboardInterrupt):
            PackTrainer(configs, folders).fit([Reporter(), Reporter(), StopAfter(1)])
        finished = [Trainer(c, f).fit() for c, f in zip(configs, folders)]
    else:  # each trains one epoch alone; then the three go on as a pack
        for c, f in zip(configs, folders):
            with pytest.raises(KeyboardInterrupt):
                Trainer(c, f).fit(StopAfter(1))
        pack = PackTrainer(configs, folders)
        assert [len(s.history) for s in pack.slots] == [1, 1, 1]
        histories, _ = pack.fit()
        finished = [histories[c.key] for c in configs]
    for k, config in enumerate(configs):
        history, weights = alone(config, tmp_path / f"a{k}")
        saved = torch.load(folders[k] / "checkpoint.pt", weights_only=True)["model"]
        assert worst(history, finished[k], weights, saved) < 1e-12


def test_forks_that_start_together_form_their_own_packs_in_key_order():
    base = tiny_trial(epochs=15)
    trials = [from_dict({**base, **iv}) for iv in (
        {}, {"seed": 1}, {"intervention": "fix_param", "layers": [1]},
        {"intervention": "fix_param", "layers": [2]}, {"intervention": "fix_lr", "layers": [1]},
        {"intervention": "fix_lr", "layers": [2]}, {"intervention": "fix_lr", "layers": [3]})]
    at = trials[0].key
    forks = {t.key: Fork(at, 7) for t in trials[4:]}
    packs = plan_packs(trials, forks, size=2)
    assert packs == plan_packs(list(reversed(trials)), forks, size=2)  # the sweep's order aside
    keys = lambda ts: sorted(t.key for t in ts)
    from_scratch = keys([trials[0], *trials[2:4]])
    assert sorted(packs, key=len, reverse=True) and sorted(sum(packs, [])) == keys(trials)
    assert [from_scratch[:2], from_scratch[2:]] == [p for p in packs if p[0] in from_scratch]
    assert [keys(trials[4:])[:2], keys(trials[4:])[2:]] == [p for p in packs
                                                             if p[0] in forks]
    assert [trials[1].key] in packs  # another seed is another trial: never packed with seed 0
    assert plan_packs(trials, forks, size=1) == [[t.key] for t in sorted(trials,
                                                                          key=lambda t: t.key)]


def test_a_pack_killed_between_two_checkpoints_catches_up_and_ends_as_each_trial_alone(tmp_path):
    # The driver-free worker: a pack of two whose second trial missed its first epoch's
    # checkpoint (the kill came between the two) resumes it alone to the first's epoch, then
    # trains them as a pack; every curve and weight equals the trial trained alone.
    from ablation.fork import fork_waits
    from ablation.grid import sweep_from_dict
    from ablation.store import RunDir, dispatch_units, plan_packs, trial_params
    from ablation.worker import receive, run_unit

    sweep = sweep_from_dict({"name": "p", "base": {**BASE, "epochs": 3},
                             "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
                             "baselines": {"AT": {"intervention": "none"}}}, source="p")
    run = RunDir(tmp_path / "run")
    run.write_manifest(sweep)
    waits = fork_waits({}, sweep.by_key, run.have())
    params = trial_params(run, sweep.by_key, 1, None, waits)
    (unit,), _ = dispatch_units(params, plan_packs(sweep.trials, {}, 2), waits)
    first, second = unit["trials"][0]["key"], unit["trials"][1]["key"]

    class Kill(Exception):
        pass

    def send(message):
        receive(run, sweep.by_key, message)
        if message.get("trial") == first and message.get("row", {}).get("epoch") == 0:
            raise Kill  # after the first trial's epoch-0 checkpoint, before the second's

    with pytest.raises(Kill):
        run_unit(unit, send)
    assert (run.trial_dir(first) / "checkpoint.pt").exists()
    assert not (run.trial_dir(second) / "checkpoint.pt").exists()
    run_unit(unit, lambda m: receive(run, sweep.by_key, m))
    starts = (run.trial_dir(second) / "attempts.log").read_text()
    assert "alone until epoch 1" in starts and "starts at epoch 1 in a pack of 2" in starts
    for k, key in enumerate((first, second)):
        history, weights = alone(sweep.by_key[key], tmp_path / f"a{k}")
        stored = run.curves(key).drop(columns=list(sweep.by_key[key].columns()) + [
            "forked_from"]).to_dict("records")
        saved = torch.load(run.trial_dir(key) / "checkpoint.pt", weights_only=True)["model"]
        assert worst(history, stored, weights, saved) < 1e-12
        assert (run.trial_dir(key) / "summary.json").exists()
