"""Run folders at a URI (ablation/remote.py), against a real S3 protocol server (moto) through
pyarrow's S3 client; a URI that pyarrow cannot open is one line."""

import pandas as pd
import pytest
from conftest import ablate, run_sweep_in_process, small_sweep, write_sweep

from ablation import open_run
from ablation.errors import AblateError
from ablation.evaluate import evaluate_run
from ablation.remote import Remote
from ablation.report import load_run
from ablation.store import RunDir, status_table

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint, monkeypatch, tmp_path):
    """An empty bucket; returns a function giving the URI of a folder in it."""
    from pyarrow import fs

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    name = f"b{tmp_path.name.lower().replace('_', '-')[-40:]}"
    fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                    allow_bucket_creation=True).create_dir(name)
    return lambda folder: (f"s3://{name}/{folder}?endpoint_override={endpoint}&scheme=http"
                           f"&region=us-east-1")


def use_cache(monkeypatch, path):
    """Stand for another machine: a run folder's mirror lives under ABLATE_CACHE."""
    monkeypatch.setenv("ABLATE_CACHE", str(path))


def test_files_round_trip_and_are_replaced_whole(bucket, tmp_path):
    remote = Remote(bucket("runs/x"))
    (tmp_path / "a.json").write_text("first")
    remote.upload(tmp_path / "a.json", "trials/k/a.json")
    (tmp_path / "a.json").write_text("second, longer")
    remote.upload(tmp_path / "a.json", "trials/k/a.json")
    assert remote.files() == ["trials/k/a.json"]
    assert remote.download("trials/k/a.json", tmp_path / "back.json")
    assert (tmp_path / "back.json").read_text() == "second, longer"
    assert not remote.download("trials/k/none.json", tmp_path / "none.json")
    remote.delete("trials/k")
    assert remote.files() == []


def partial_run_at(uri, monkeypatch, tmp_path):
    """small_sweep written to ``uri`` from one machine, its trial 0 stopped after 1 epoch: the
    local mirror it was written through."""
    use_cache(monkeypatch, tmp_path / "writer")
    return run_sweep_in_process(small_sweep(), uri, stop_after={0: 1})


def test_a_run_written_to_s3_is_read_from_another_machine(bucket, monkeypatch, tmp_path):
    uri = bucket("runs/small")
    mirror = partial_run_at(uri, monkeypatch, tmp_path)
    written = pd.read_parquet(mirror / "curves")

    use_cache(monkeypatch, tmp_path / "reader")  # a machine that has never seen the run
    run = load_run(uri)
    assert run.root != mirror and run.partial
    pd.testing.assert_frame_equal(run.curves[written.columns].sort_values(["key", "epoch"])
                                  .reset_index(drop=True),
                                  written.sort_values(["key", "epoch"]).reset_index(drop=True))
    states = dict(status_table(RunDir.open(uri))[0][["key", "state"]].values)
    assert sorted(states.values()) == ["done", "pending"]


def test_open_run_reads_a_run_at_s3_and_refresh_pulls_its_new_epochs(bucket, monkeypatch,
                                                                      tmp_path):
    uri = bucket("runs/small")
    partial_run_at(uri, monkeypatch, tmp_path)
    use_cache(monkeypatch, tmp_path / "reader")
    run = open_run(uri)
    assert sorted(run.configs.state) == ["done", "pending"] and len(run.curves) == 3

    use_cache(monkeypatch, tmp_path / "writer")
    run_sweep_in_process(small_sweep(), uri)  # the writer finishes the stopped trial
    use_cache(monkeypatch, tmp_path / "reader")
    run.refresh()
    assert set(run.configs.state) == {"done"} and len(run.curves) == 4
    assert run.curves.complete.all() and len(run.summary) == 2


@pytest.mark.slow
def test_a_run_at_s3_is_evaluated_from_other_machines(bucket, monkeypatch, tmp_path):
    """AutoAttack on the run of the test above, from a machine that pulls the finished trial's
    checkpoint; another machine then reads the numbers from the bucket."""
    uri = bucket("runs/small")
    partial_run_at(uri, monkeypatch, tmp_path)
    use_cache(monkeypatch, tmp_path / "reader")
    states = dict(status_table(RunDir.open(uri))[0][["key", "state"]].values)

    use_cache(monkeypatch, tmp_path / "evaluator")  # pulls the finished trial's checkpoint
    (key,) = evaluate_run(uri, 8, echo=lambda message: None)
    assert states[key] == "done"

    use_cache(monkeypatch, tmp_path / "reader2")
    summary = RunDir.open(uri).summaries().set_index("key")
    assert summary.loc[key, "autoattack_n"] == 8  # the numbers reached the bucket
    assert 0 <= summary.loc[key, "best_autoattack_acc"] <= 1


def test_a_storage_uri_pyarrow_cannot_open_is_refused_in_one_line(tmp_path):
    done = ablate("run", write_sweep(tmp_path / "s.yaml"), "--storage", "nosuch://bucket/runs")
    assert done.returncode == 2 and "nosuch://bucket/runs" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bucket_that_does_not_exist_gives_one_line_errors(bucket):
    uri = bucket("x").replace("s3://b", "s3://missing-b", 1)
    run = RunDir.open(uri)  # nothing to pull
    with pytest.raises(AblateError, match="not an ablate run folder"):
        run.trials()
    with pytest.raises(AblateError, match="missing-b") as error:
        run.write_states({})  # the first write names the URI and the reason
    assert "\n" not in str(error.value) and "state.json" in str(error.value)


def test_background_uploads_send_what_was_handed_over_in_order_and_raise_a_failure(tmp_path):
    """A file replaced (atomically) or removed after it was handed over still arrives as it was
    then; a deletion follows its batch's uploads; a failed upload surfaces in the caller."""
    from ablation.io import save_json
    from ablation.remote import BackgroundUploads

    local, bucket = tmp_path / "mirror", tmp_path / "bucket"
    remote = Remote(f"file://{bucket}")
    uploads = BackgroundUploads(remote, local)
    best, checkpoint = local / "t" / "best-1.pt", local / "t" / "checkpoint.pt"
    save_json({"epoch": 1}, best)
    save_json({"best": 1}, checkpoint)
    uploads.submit([best, checkpoint])
    save_json({"best": 2}, checkpoint)  # the next epoch's, replacing it at once
    best.unlink()
    uploads.flush()
    assert (bucket / "t" / "best-1.pt").read_text() == '{\n  "epoch": 1\n}\n'
    assert (bucket / "t" / "checkpoint.pt").read_text() == '{\n  "best": 1\n}\n'
    uploads.submit([checkpoint], [best])
    uploads.flush()
    assert not (bucket / "t" / "best-1.pt").exists()
    assert "2" in (bucket / "t" / "checkpoint.pt").read_text()
    assert not [p for p in local.rglob(".*") if p.is_file()]  # no staged copy is left

    def broken(path, rel):
        raise AblateError(f"{rel}: cannot write (the store is down)")

    remote.upload = broken
    uploads.submit([checkpoint])
    with pytest.raises(AblateError, match="checkpoint.pt: cannot write"):
        uploads.flush()
    with pytest.raises(AblateError):  # and every later call, until the trial is retried
        uploads.submit([checkpoint])


class _FullDisk:
    """A pyarrow file system whose output streams take 10 bytes, then fail as a full disk does
    (pyarrow keeps the errno only in its message)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def open_output_stream(self, path):
        stream = self.real.open_output_stream(path)

        class Failing:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, block):
                stream.write(block[:10])
                raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No "
                              "space left on device")
        return Failing()


def test_a_full_file_target_is_named_and_leaves_no_temporary_file(tmp_path):
    from ablation.errors import RunFailed

    target = tmp_path / "target"
    remote = Remote(f"file://{target}")
    remote.fs = _FullDisk(remote.fs)
    local = tmp_path / "local.bin"
    local.write_bytes(b"x" * 1000)
    with pytest.raises(RunFailed) as err:
        remote.upload(local, "trials/t/checkpoint.pt")
    assert str(err.value) == (f"file://{target}: no space left on the device (writing "
                              "trials/t/checkpoint.pt); free some space there, then run the same "
                              "command again to resume")
    assert [p.name for p in (target / "trials" / "t").iterdir()] == []
