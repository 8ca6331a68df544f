"""What a trial ran on: package, git commit, torch and CUDA versions, device. Each summary.json
keeps it, so a number in a table can be traced to the code and machine that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from . import __version__


def git_commit() -> str | None:
    """The commit of the source tree ablate runs from, when it is a git checkout (an installed
    copy in site-packages has none, even inside someone else's repository)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def provenance(device: torch.device | str) -> dict[str, Any]:
    """Flat fields for a trial's summary: ``ablate_version``, ``git_commit``, ``torch_version``,
    ``cuda_version`` and ``device_name``."""
    device = torch.device(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else device.type)
    return {"ablate_version": __version__, "git_commit": git_commit(),
            "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "device_name": name}
