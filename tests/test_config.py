"""Trial configs: paper defaults, YAML round trip, stable keys, one-line refusals."""

import subprocess
import sys
import time

import pytest
import yaml

from ablation.config import RUNTIME_FIELDS, TrialConfig, from_dict, load_trial, parse_yaml
from ablation.errors import ConfigError


def test_paper_defaults_follow_dataset_method_and_model():
    c = from_dict({})
    assert (c.eps, c.step, c.lr_max, c.awp_gamma, c.awp_warmup) == (8 / 255, 2 / 255, 0.1, 0.01, 0)
    assert (c.train_steps, c.test_steps, c.epochs, c.batch_size) == (10, 20, 200, 128)
    assert c.train_attack_mode == "train" and c.normalize and c.lr_update == "iteration"
    svhn = from_dict({"dataset": "svhn"})
    assert (svhn.step, svhn.lr_max, svhn.awp_warmup) == (1 / 255, 0.01, 5)
    assert from_dict({"dataset": "svhn", "threat": "l2"}).awp_warmup == 0
    l2 = from_dict({"threat": "l2"})
    assert (l2.eps, l2.step) == (128 / 255, 15 / 255)
    trades = from_dict({"method": "trades"})
    assert (trades.awp_gamma, trades.awp_warmup, trades.step) == (0.005, 10, 2 / 255)
    assert trades.train_attack_mode == "eval" and not trades.normalize
    assert trades.lr_update == "epoch"
    assert from_dict({"method": "trades", "threat": "l2"}).step == pytest.approx(2 * (128 / 255) / 10)
    assert (from_dict({"model": "vgg16"}).awp_gamma, from_dict({"model": "vgg16"}).awp_warmup) == (
        0.005, 10)


def test_explicit_values_beat_defaults_and_fractions_parse():
    c = from_dict({"dataset": "svhn", "eps": "4/255", "step": 0.5 / 255, "lr_max": 0.05})
    assert (c.eps, c.step, c.lr_max) == (4 / 255, 0.5 / 255, 0.05)


def test_yaml_round_trip_gives_the_same_config_and_key(tmp_path):
    c = from_dict({"dataset": "cifar100", "intervention": "awp", "layers": [4, 3], "seed": 2})
    path = tmp_path / "trial.yaml"
    path.write_text(c.to_yaml())
    back = load_trial(path)
    assert back == c and back.key == c.key and back.layers == (3, 4)


def test_key_is_readable_and_stable_across_processes():
    c = from_dict({"intervention": "fix_lr", "layers": [3, 4]})
    assert c.key.startswith("cifar10-linf-preact18-at-fix_lr-34-s0-")
    code = ("from ablation.config import from_dict;"
            "print(from_dict({'intervention': 'fix_lr', 'layers': [3, 4]}).key)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "123"}, check=True).stdout.strip()
    assert other == c.key
    # A literal: changing what a key hashes would orphan every stored run, so it must be deliberate
    # (0.2.0 added log_pass_mode and made test_batch_size a runtime field: README, 0.2.0).
    assert c.key == "cifar10-linf-preact18-at-fix_lr-34-s0-73cad2d2"


def test_a_new_runtime_field_leaves_every_key_as_it_was():
    # The default trial's key, recorded before `compile` was added (0.2.0's fields): a field that
    # only changes speed must not orphan the stored runs.
    assert from_dict({}).key == "cifar10-linf-preact18-at-none-s0-484cb3bf"
    assert "compile" in RUNTIME_FIELDS and "compile" not in from_dict({}).identity()


def test_key_changes_with_what_is_computed_but_not_with_where_it_runs():
    c = from_dict({})
    assert c.replace(data_root="/scratch/data", device="cuda", download=True,
                     test_batch_size=1024, channels_last=True, compile=True).key == c.key
    for change in ({"seed": 1}, {"awp_gamma": 0.02}, {"epochs": 100}, {"precision": "bf16"},
                   {"log_pass_mode": "eval"}):
        assert c.replace(**change).key != c.key, change


@pytest.mark.parametrize("raw,needle", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"intervention": "fix_param"}, "key 'layers'"),
    ({"intervention": "fix_lr", "layers": [5]}, "[5]"),
    ({"intervention": "awp", "layers": [1, 1]}, "key 'layers'"),
    ({"layers": [1]}, "takes no layer subset"),
    ({"eps": 0}, "key 'eps'"),
    ({"eps": 8}, "write 8/255"),
    ({"epochs": 2.5}, "key 'epochs'"),
    ({"download": "yes"}, "key 'download'"),
    ({"compile": 1}, "key 'compile' must be true or false"),
    ({"threat": "l1"}, "key 'threat': 'l1' is not one of linf, l2"),
    ({"device": "gpu"}, "key 'device'"),
    ({"milestones": [0.75, 0.5]}, "key 'milestones'"),
    ({"layers": "34"}, "key 'layers' must be a list"),
    ({"seed": 2**32}, "key 'seed': must be below 2**32"),
    ({"threat": "l2", "eps": float("inf")}, "key 'eps': must be a finite number, got inf"),
    ({"trades_beta": float("nan")}, "key 'trades_beta': must be a finite number, got nan"),
    ({"lr_max": 1e300}, "key 'lr_max': 1e+300 is beyond float32's range"),
    ({"weight_decay": -1e39}, "key 'weight_decay': -1e+39 is beyond float32's range"),
    ({"milestones": [0.5, float("inf")]}, "key 'milestones': must be a finite number"),
    ({"eps": "1/0"}, "key 'eps': '1/0' is not a number or a fraction"),
    ({"step": "./255"}, "key 'step': './255' is not a number or a fraction"),
    ({"eps": "1e999/1"}, "key 'eps': must be a finite number, got inf"),
])
def test_bad_values_are_refused_with_one_line_naming_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(raw, source="t.yaml")
    message = str(err.value)
    assert needle in message and message.startswith("t.yaml: ") and "\n" not in message


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_trial(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_trial(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_trial(bad)


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("epochs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_trial(evil)


def billion_laughs(levels: int = 9) -> str:
    """A 700-byte YAML value standing for 9^levels strings through nested aliases."""
    rows = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels - 1)]
    rows.append("[" + ", ".join([f"*a{levels - 2}"] * 9) + "]")
    return "[" + ", ".join(rows) + "]"


@pytest.mark.parametrize("text, needle", [
    ("milestones: " + billion_laughs() + "\n", "aliases (*name) expand to more than 100,000"),
    ("layers: &a [1, *a]\n", "refers to a value that contains it"),
    ("layers: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("seed: 1" + "0" * 5000 + "\n", "not valid YAML (Exceeds the limit (4300 digits)"),
    ("seed: 2024-13-01\n", "not valid YAML (month must be in 1..12)"),
])
def test_hostile_yaml_is_one_line_within_a_second(tmp_path, text, needle):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_trial(path)
    message = str(err.value)
    assert needle in message and message.startswith(f"{path}: ") and "\n" not in message
    assert time.perf_counter() - start < 5, "the file should be refused at once"


def test_a_value_quoted_in_an_error_is_cut_short():
    bomb = yaml.safe_load(billion_laughs(7))[-1]  # 9^7 strings, built by PyYAML as shared lists
    for raw, needle in [({"milestones": [bomb]}, "key 'milestones' must be a number, got [[["),
                        ({"data_root": bomb}, "key 'data_root' must be a string, got [[["),
                        ({"model": "y" * 10**5}, "key 'model': 'yyy"),
                        ({"x" * 10**5: 1}, "unknown key 'xxx"),
                        ({"intervention": "awp", "layers": [1] * 10**5}, "key 'layers': [1, 1,")]:
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            from_dict(raw, source="t.yaml")
        assert time.perf_counter() - start < 2
        # the list of allowed keys is 400 characters by itself
        assert needle in str(err.value) and len(str(err.value)) < 600, str(err.value)[:600]


def test_merge_keys_and_small_aliases_still_load(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("milestones: &m [0.25, 0.5]\nlayers: []\n")
    assert load_trial(path).milestones == (0.25, 0.5)
    merged = parse_yaml("base: &b {epochs: 3}\ntrial: {<<: *b, seed: 1}\n", "test")
    assert merged["trial"] == {"epochs": 3, "seed": 1}


def test_binary_and_oversized_files_are_refused_naming_the_file(tmp_path):
    binary = tmp_path / "t.yaml"
    binary.write_bytes(b"epochs: 3\n\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match=r"t.yaml: not UTF-8 text \(byte 10\)"):
        load_trial(binary)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 30_000)
    with pytest.raises(ConfigError, match="big.yaml: larger than 256 KB"):
        load_trial(big)


def test_config_is_frozen():
    with pytest.raises(Exception):
        TrialConfig().epochs = 3


def test_exponent_numbers_that_yaml_reads_as_text_are_numbers():
    # YAML 1.1 (PyYAML's safe_load) reads 1e-3 as a string; ablate's loader reads it as YAML 1.2.
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}
    c = from_dict(parse_yaml("lr_max: 1e-3\nweight_decay: 5E-4\neps: 2.e-2\nseed: 12", "t"))
    assert (c.lr_max, c.weight_decay, c.eps, c.seed) == (0.001, 0.0005, 0.02, 12)
