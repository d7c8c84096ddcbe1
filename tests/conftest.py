"""Test-wide settings: one torch thread per process.

The toy models are far too small to gain from intra-op threads, and on a 2-core machine several
processes (pytest, a CLI run, two DDP ranks) each spinning two threads slow each other down by an
order of magnitude. Subprocesses inherit ``OMP_NUM_THREADS``.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
