"""The dataset files: their names, the torch-free check that they are there, and `ablate data`'s
fetch and verify."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_DATASETS, write_fake_dataset

from ablation.datafiles import LAYOUTS, check_data
from ablation.errors import ConfigError, DataError


def test_file_names_are_torchvisions():
    from torchvision import datasets as tvd

    for name, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        layout = LAYOUTS[name]
        assert layout.folder == cls.base_folder
        assert list(layout.train) == [f for f, _ in cls.train_list]
        assert list(layout.test) == [f for f, _ in cls.test_list]
        assert list(layout.meta) == [cls.meta["filename"]]
    svhn = LAYOUTS["svhn"]
    assert (svhn.folder, svhn.train, svhn.test) == (
        "", (tvd.SVHN.split_list["train"][1],), (tvd.SVHN.split_list["test"][1],))


def test_the_check_imports_no_torch():
    code = ("import sys; from ablation.datafiles import check_data; "
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", FAKE_DATASETS)
def test_complete_data_passes_and_each_missing_or_empty_file_is_named(tmp_path, name):
    write_fake_dataset(name, tmp_path, 6, 3, seed=0)
    check_data(name, tmp_path, download=False)
    layout = LAYOUTS[name]
    last = tmp_path / layout.folder / (*layout.train, *layout.test, *layout.meta)[-1]
    last.write_bytes(b"")
    with pytest.raises(DataError, match=f"^{name}: {last} is empty"):
        check_data(name, tmp_path, download=True)  # a download would not replace it
    last.unlink()
    with pytest.raises(DataError) as err:
        check_data(name, tmp_path, download=False)
    assert str(err.value).startswith(f"{name}: no data at {last} (put ")
    assert "set download: true" in str(err.value)
    check_data(name, tmp_path, download=True)  # missing files are what a download fetches


def test_a_missing_folder_is_named_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        check_data("cifar10", "data", download=False)
    assert str(err.value) == (f"cifar10: no data at {tmp_path}/data/cifar-10-batches-py (put "
                              f"the extracted dataset there, or run `ablate data cifar10 --root "
                              f"{tmp_path}/data`, or set download: true)")


def test_a_download_into_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"cannot download into .*/file/data: .*/file is a file"):
        check_data("svhn", tmp_path / "file" / "data", download=True)


def test_datasets_without_files_pass_and_unknown_names_are_config_errors(tmp_path):
    check_data("digits", tmp_path / "nowhere", download=False)
    check_data("synthetic", tmp_path / "nowhere", download=False)
    with pytest.raises(ConfigError, match="'mnist'"):
        check_data("mnist", tmp_path, download=False)


def test_the_check_reads_nothing(tmp_path):
    # Format errors are found by load_data (test_data.py); the check stays cheap for the driver.
    write_fake_dataset("cifar10", tmp_path, 6, 3, seed=0)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    check_data("cifar10", tmp_path, download=False)


def _md5_table(root, name):
    import hashlib

    from ablation.datafiles import expected_files

    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in expected_files(name, root)}


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_verify_data_checks_every_file_against_the_official_md5(tmp_path, monkeypatch, name):
    from ablation import datafiles as data_module

    root = tmp_path / "d"
    write_fake_dataset(name, root, n_train=20, n_test=10)
    assert set(data_module.official_md5(name)) == set(_md5_table(root, name))  # same files
    # The fake files are not the official ones: the first one checked is named.
    with pytest.raises(DataError, match="is not the official file"):
        data_module.verify_data(name, root)
    table = _md5_table(root, name)  # as if these were the official files
    monkeypatch.setattr(data_module, "official_md5", lambda n: table)
    assert len(data_module.verify_data(name, root)) == len(table)
    victim = sorted(table)[0]
    (root / victim).write_bytes(b"corrupt")
    with pytest.raises(DataError, match=re.escape(str(root / victim))):
        data_module.verify_data(name, root)


def test_fetch_data_downloads_once_under_a_lock_then_verifies(tmp_path, monkeypatch):
    import threading

    from ablation import datafiles as data_module

    source = tmp_path / "source"
    write_fake_dataset("cifar10", source, n_train=20, n_test=10)
    table = _md5_table(source, "cifar10")
    monkeypatch.setattr(data_module, "official_md5", lambda n: table)
    calls = []

    def fake_download(url, root, filename, md5):  # what torchvision's would leave behind
        calls.append(url)
        shutil.copytree(source / "cifar-10-batches-py", Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", fake_download)
    target = tmp_path / "shared"
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        data_module.fetch_data("cifar10", target))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and all(len(r) == 7 for r in results)


@pytest.mark.parametrize("name,archive", [("cifar10", "cifar-10-python.tar.gz"),
                                          ("svhn", "train_32x32.mat")])
def test_offline_fetch_names_the_url_and_the_file_to_copy_and_leaves_no_lock(
        tmp_path, monkeypatch, name, archive):
    # An unreachable URL, as on a node without internet: a refused connection on port 9.
    from torchvision import datasets as tvd

    from ablation import datafiles as data_module

    url = f"http://127.0.0.1:9/{archive}"
    if name == "svhn":
        splits = {s: (f"http://127.0.0.1:9/{f}", f, md5)
                  for s, (_, f, md5) in tvd.SVHN.split_list.items()}
        monkeypatch.setattr(tvd.SVHN, "split_list", splits)
    else:
        monkeypatch.setattr(tvd.CIFAR10, "url", url)
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        data_module.fetch_data(name, root)
    message = str(err.value)
    assert "\n" not in message and f"cannot download {url}" in message
    assert message.endswith(f"copy {archive} (from {url}) into {root} and run the same command "
                            "again")
    assert sorted(p.name for p in root.iterdir()) == []  # no lock file, no partial download
    # A wrong file already there is named as such instead.
    (root / archive).write_bytes(b"not the archive")
    with pytest.raises(DataError, match=re.escape(f"{root / archive} is not the official file")):
        data_module.fetch_data(name, root)
    assert sorted(p.name for p in root.iterdir()) == [archive]


def test_an_archive_copied_into_the_folder_is_extracted_and_verified_offline(tmp_path,
                                                                            monkeypatch):
    # What the offline message tells the user to do, done: the archive in the folder, no network.
    import hashlib
    import tarfile

    from torchvision import datasets as tvd

    from ablation import datafiles as data_module

    source = tmp_path / "source"
    write_fake_dataset("cifar10", source, n_train=20, n_test=10)
    monkeypatch.setattr(data_module, "official_md5", lambda n: _md5_table(source, n))
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(tvd.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", hashlib.md5(
        (root / "cifar-10-python.tar.gz").read_bytes()).hexdigest())
    assert len(data_module.fetch_data("cifar10", root)) == 7
    check_data("cifar10", root, download=False)
    assert not (root / ".ablate-download.lock").exists()
