"""Every ``L0K_*`` environment switch, declared and read in this one module (table: docs/design.md,
"Environment switches").

Run-time switches are read once, when ``l0kernels`` is imported, and kept as this module's constants; the
modules that use them copy them into their own names (``_active.ENABLED``, ``backends.cuda.SKIP_BELOW``, ...),
which tests and benchmarks may set. :func:`auto_tune` is read at every use. Build switches are read by
``setup.py``, which loads this file by path (it imports nothing but the standard library), so the names,
defaults and meanings live here too. ``python -m l0kernels.config`` prints the table with the current values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Switch:
    """One environment switch: its name, default (as the environment would spell it), what it does, when it
    is read (``"import"``, ``"each use"`` or ``"build"``) and the module that uses it."""

    name: str
    default: str
    doc: str
    when: str
    used_by: str
    parse: Callable[[str], object]
    choices: Optional[Tuple[str, ...]] = None

    def value(self):
        """The switch's value now: the environment's, else the default, parsed (a bad value raises
        ``ValueError`` naming the switch)."""
        raw = os.environ.get(self.name, self.default)
        if self.choices is not None and raw not in self.choices:
            raise ValueError(f"{self.name} must be one of {self.choices}, got {raw!r}")
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}: cannot read {raw!r} ({e})") from None


SWITCHES: Dict[str, Switch] = {}


def _on(raw: str) -> bool:
    """A flag: anything but ``"0"`` is on (the package's switches have always read that way)."""
    return raw != "0"


def _is_one(raw: str) -> bool:
    """A flag that is on only when set to ``"1"``."""
    return raw == "1"


def _declare(name: str, default: str, doc: str, when: str, used_by: str, parse=str, choices=None):
    sw = SWITCHES[name] = Switch(name, default, doc, when, used_by, parse, choices)
    return sw.value() if when == "import" else None


# -- run time: skipping closed groups in training --------------------------------------------------------
SKIP_CLOSED: bool = _declare(
    "L0K_SKIP_CLOSED", "1", "0: no backend skips closed groups in training (every call takes the dense path)",
    "import", "_active.ENABLED (torch CPU path, Triton, CUDA)", _on)
SKIP_DENSE_ABOVE: float = _declare(
    "L0K_SKIP_DENSE_ABOVE", "0.7", "torch backend, CPU: a linear layer gathers its open groups only when at most "
    "this fraction of its features is open", "import", "_active.DENSE_ABOVE", float)
SKIP_CONV_DENSE_ABOVE: float = _declare(
    "L0K_SKIP_CONV_DENSE_ABOVE", "0.9", "the same for convolutions", "import", "_active.CONV_DENSE_ABOVE", float)
SKIP_MIN_MACS: int = _declare(
    "L0K_SKIP_MIN_MACS", str(1 << 20), "torch backend, CPU: skip only when at least this many multiply-adds "
    "are closed", "import", "_active.MIN_SKIPPED_MACS", int)
TRITON_SKIP_BELOW: float = _declare(
    "L0K_TRITON_SKIP_BELOW", "0.5", "Triton: a layer takes the open-set kernels once its open fraction is at "
    "most this (1: always)", "import", "backends.triton._gate_math.SKIP_BELOW", float)
CUDA_SKIP_BELOW: float = _declare(
    "L0K_CUDA_SKIP_BELOW", "0.5", "CUDA extension, linear: the open-set GEMMs once the open fraction is at most "
    "this (1: always)", "import", "backends.cuda.SKIP_BELOW", float)
CUDA_CONV_SKIP_BELOW: float = _declare(
    "L0K_CUDA_CONV_SKIP_BELOW", "0.25", "CUDA extension, conv2d: the im2col open-set path once the open "
    "fraction is at most this", "import", "backends.cuda.CONV_SKIP_BELOW", float)
CUDA_IM2COL_MAX_BYTES: int = _declare(
    "L0K_CUDA_IM2COL_MAX_BYTES", str(2 << 30), "CUDA extension, conv2d: above this im2col size the call keeps "
    "cuDNN", "import", "backends.cuda.IM2COL_MAX_BYTES", int)

# -- run time: kernels and tuning ---------------------------------------------------------------------------
CPU_KERNELS: bool = _declare(
    "L0K_CPU_KERNELS", "1", "0: the torch backend ignores the C++ CPU kernels (gates, fast paths, regularizer); "
    "the Philox stream still uses them (same bits)", "import", "_gates, _regularizer, backends.torch.cpu_paths", _on)
CUDA_GEMM: str = _declare(
    "L0K_CUDA_GEMM", "auto", "CUDA extension, l0_linear forward: fused (one launch), two_pass (cuBLAS + gate "
    "kernels) or auto (timed)", "import", "backends.cuda.GEMM_IMPL", str, ("auto", "fused", "two_pass"))
TRITON_AUTOTUNE: bool = _declare(
    "L0K_TRITON_AUTOTUNE", "1", "0: the Triton kernels use one fixed configuration on a GPU (no tuning runs)",
    "import", "backends.triton.linear / sparse_eval AUTOTUNE", _on)
TRITON_PREGATE_TILES: int = _declare(
    "L0K_TRITON_PREGATE_TILES", "4", "Triton: gate an operand once into a temporary when the other GEMM dimension "
    "spans more than this many 64-wide tiles (-1: always gate on load)", "import",
    "backends.triton.linear.PREGATE_MIN_TILES", int)
_declare("L0K_AUTO_TUNE", "1", "0: backend=\"auto\" times nothing and takes the priority order", "each use",
         "_autotune.Autotuner.can_time", _on)

# -- build time (setup.py) -----------------------------------------------------------------------------------
_declare("L0K_SKIP_CUDA", "0", "1: never build the CUDA extension l0kernels._C", "build", "setup.py", _is_one)
_declare("L0K_FORCE_CUDA", "0", "1: build _C without a visible GPU (needs a CUDA build of PyTorch and nvcc)",
         "build", "setup.py", _is_one)
_declare("L0K_SKIP_CPU_EXT", "0", "1: never build the C++ CPU extension l0kernels._cpu", "build", "setup.py",
         _is_one)
_declare("L0K_CPU_SIMD", "1", "0: build _cpu as plain scalar code (no vector flags, function clones or glibc's "
         "vector math)", "build", "setup.py", _on)


def auto_tune() -> bool:
    """``L0K_AUTO_TUNE``, read now (tests and users switch it while the process runs)."""
    return SWITCHES["L0K_AUTO_TUNE"].value()


def build_flag(name: str) -> bool:
    """A build switch's value now (``setup.py``)."""
    sw = SWITCHES[name]
    if sw.when != "build":
        raise KeyError(f"{name} is not a build switch")
    return sw.value()


def table() -> str:
    """The switches as a markdown table: name, default, current value, when read, used by, what it does."""
    rows = ["| switch | default | now | read | used by | what it does |", "|---|---|---|---|---|---|"]
    for sw in SWITCHES.values():
        now = os.environ.get(sw.name, "")
        rows.append(f"| `{sw.name}` | `{sw.default}` | {f'`{now}`' if now else '(default)'} | {sw.when} | "
                    f"{sw.used_by} | {sw.doc} |")
    return "\n".join(rows)


__all__ = ["Switch", "SWITCHES", "auto_tune", "build_flag", "table"]

if __name__ == "__main__":
    print(table())
