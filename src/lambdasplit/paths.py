"""Where lambdasplit keeps converted models and other reusable artefacts."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LAMBDASPLIT_CACHE, else ~/.cache/lambdasplit."""
    root = os.environ.get("LAMBDASPLIT_CACHE") or Path.home() / ".cache" / "lambdasplit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
