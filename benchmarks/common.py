"""Helpers shared by the benchmark scripts: machine description and dated result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": _dt.date.today().isoformat()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                          else f"cpu ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return info


def free_port() -> int:
    """A free TCP port on localhost, for the ranks of a multi-process benchmark."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save(name: str, payload: dict, markdown: str) -> Path:
    """Write results/<name>-<date>.json and .md; return the stem."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{name}-{payload['machine']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"saved {stem}.json and .md")
    return stem
