"""kdcore: knowledge distillation with a C core.

    import kdcore
    train = kdcore.datasets.fashion_mnist("train")
    test = kdcore.datasets.fashion_mnist("test")
    model = kdcore.models.resnet8(num_classes=10, in_channels=1)
    hist = kdcore.fit(model, train, epochs=10, val=test)
"""
from __future__ import annotations

import platform
import sys

import numpy as np

from . import _kdcore, callbacks, datafree, datasets, explain, functional, losses, metrics, models, nn, optim
from .checkpoint import CheckpointMismatch, load, load_torch, save
from .distill import adversarial, distill, exit_accuracies, kl_divergence, multi_exit, mutual, slkd
from .schemes import born_again, dgkd, eskd, snapshot_distill, takd, tf_kd
from .training import History, LRFind, evaluate, fit, lr_find, predict

__version__ = _kdcore.version
# KDCORE_ISA is read here, at import (the kernels' first use): an unknown value, or an
# instruction set this CPU lacks, raises RuntimeError now rather than leaving the kernels on
# another instruction set than the one asked for (the C library falls back to the automatic
# choice, and says so in show_config()).
_kdcore.isa_init()
__all__ = ["nn", "models", "datasets", "functional", "losses", "metrics", "explain", "datafree", "optim", "callbacks", "fit",
           "evaluate", "predict", "History", "lr_find", "LRFind",
           "distill", "mutual", "slkd", "adversarial", "multi_exit", "exit_accuracies", "kl_divergence",
           "born_again", "takd", "dgkd", "snapshot_distill", "eskd", "tf_kd",
           "save", "load", "load_torch", "CheckpointMismatch", "set_num_threads", "get_num_threads", "set_deterministic",
           "get_deterministic", "set_isa", "get_isa", "supported_isas", "show_config"]


def set_num_threads(n):
    """Threads for kdcore's OpenMP loops and its (OpenMP) OpenBLAS."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    _kdcore.set_num_threads(n)


def get_num_threads():
    """Threads kdcore's OpenMP loops (and OpenBLAS) use; see ``set_num_threads``."""
    return _kdcore.get_num_threads()


def set_deterministic(on=True):
    """Deterministic mode (process-wide, off by default): results bitwise identical across runs
    AND across thread counts (``set_num_threads``), not only for the same thread count. The
    kernels whose work split can follow the thread count (linear layers on OpenBLAS, conv
    weight/bias gradient partials) run kdcore's own linear product and fixed batch chunks
    instead; measured within noise of the default speed (DEVELOPERS.md, "Determinism"). Do
    not switch it while training runs in another thread."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {type(on).__name__}")
    _kdcore.set_deterministic(on)


def get_deterministic():
    """Whether deterministic mode is on; see ``set_deterministic``."""
    return _kdcore.get_deterministic()


def set_isa(isa):
    """Instruction set of kdcore's kernels (process-wide): ``"avx512"``, ``"avx2"``,
    ``"portable"`` (the plain C kernels) or ``"auto"`` (the best the CPU supports, the default).
    The environment variable ``KDCORE_ISA`` sets it at import; this switches it later.
    Convolutions, BatchNorm and pooling give bitwise the same results on every instruction
    set; linear layers run kdcore's own product with AVX-512 when OpenBLAS's kernels are not
    AVX-512, else OpenBLAS (``OPENBLAS_CORETYPE`` picks OpenBLAS's own kernels), which changes
    their rounding only (deterministic mode: always the own product, bitwise equal).
    ValueError for an unknown name or one this CPU lacks (``supported_isas()``). Switch it
    between calls, not while training runs in another thread."""
    if not isinstance(isa, str):
        raise TypeError(f"isa must be a str, got {type(isa).__name__}")
    _kdcore.set_isa(isa)


def get_isa():
    """The instruction set the kernels run now: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _kdcore.get_isa()


def supported_isas():
    """The instruction sets this CPU supports, best first, e.g. ``("avx512", "avx2", "portable")``."""
    return _kdcore.supported_isas()


def show_config(file=None):
    """Print the BLAS build and core, the kernels' instruction set (and how it was chosen),
    what runs the linear layers, whether Winograd runs the 3x3 convs (``KDCORE_WINOGRAD=0``
    turns it off), thread count and versions."""
    lines = [
        f"kdcore {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"numpy {np.__version__}",
        f"BLAS: {_kdcore.blas_config()}",
        f"kernels: {_kdcore.isa_config()}",
        f"winograd: {_kdcore.winograd_config()}",
        f"threads: {get_num_threads()}",
        f"deterministic: {get_deterministic()}",
    ]
    print("\n".join(lines), file=file)
