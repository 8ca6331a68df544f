"""Atomic writes: the files a run writes honour the umask, like any file the user makes."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); "
            "from ablation.io import save_json; save_json({'a': 1}, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, oct(umask), str(tmp_path / "x.json")], check=True)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left
