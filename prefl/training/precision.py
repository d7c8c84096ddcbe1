"""bf16 on a CPU: fast where the CPU computes it natively, very slow where it does not.

On a CPU with AMX or AVX-512 BF16, ``Trainer(precision="bf16-mixed")`` runs a SmolLM2-sized
model about twice as fast as float32 (docs/real-model.md). On a CPU without them (AVX2 only:
most laptops and many cloud x86 machines) PyTorch emulates bf16 matrix products, and they run
about two orders of magnitude slower than float32 (measured here on an AVX2 AMD EPYC: a
1024 x 1024 matmul takes 20 ms in float32 and 2.5 s in bf16). A run that asks for bf16 there is
told so once, with the fix (:func:`warn_if_slow_cpu_bf16`).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX tiles or AVX-512 BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_precision() -> str:
    """The fast Lightning precision for training on this CPU: ``bf16-mixed`` where bf16 is
    native, ``32-true`` elsewhere."""
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def warn_if_slow_cpu_bf16(precision: str, on_cpu: bool) -> bool:
    """Warn (rank 0, once per call) when a run computes in bf16 on a CPU that emulates it.

    Args:
        precision: The Trainer's precision (``"bf16-mixed"``, ``"bf16-true"``, ``"32-true"``...).
        on_cpu: Whether the run's accelerator is the CPU.

    Returns:
        Whether it warned.
    """
    if not (on_cpu and str(precision).startswith("bf16")) or cpu_has_native_bf16():
        return False
    rank_zero_warn(
        f"precision={precision} on a CPU without native bf16 (no AMX / AVX-512 BF16): PyTorch "
        "emulates bf16 matrix products here, about 100x slower than float32. Use "
        "`--trainer.precision 32-true` (Trainer(precision='32-true')) on this machine."
    )
    return True
