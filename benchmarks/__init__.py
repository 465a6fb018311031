"""Reproducible benchmarks for lambdasplit: `python -m benchmarks --help`."""

import os

# The same default lambdasplit sets on import (see src/lambdasplit/__init__.py); here it must come
# before the benchmarks import torch, or the device side's OpenMP threads spin while waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
