"""The one table of benchmark shapes, dtypes and repetition settings.

Every cell of a run is ``(op, mode, provider, dtype, N, V)``:

- ``op``: a per-token op (``logps``, ``kl``) on logits ``[N, V]`` with labels ``[N]``, or a loss
  (``dpo``, ``tdpo2``, ``tis_dpo``, ``ti_dpo``) on logits ``[2B, T, V]`` with ``2B * T = N``
  (``B = PAIRS`` preference pairs, so ``T = N / (2 * PAIRS)``);
- ``mode``: ``fwd``, ``bwd`` or ``full`` (fwd + bwd), see :mod:`benchmarks.cases`;
- ``provider``: ``tidpo``, ``eager``, ``compile``, ``liger``.

``python -m benchmarks.run --set NAME`` and the pytest-benchmark suite (``pytest benchmarks/``) both
read the sets below; nothing else defines shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

OPS = ("logps", "kl")
LOSSES = ("dpo", "tdpo2", "tis_dpo", "ti_dpo")
ALL_OPS = OPS + LOSSES
MODES = ("fwd", "bwd", "full")
#: In the order each (op, shape) group measures them: torch.compile last, since its cold compile is the slowest.
PROVIDERS = ("tidpo", "eager", "liger", "compile")

PAIRS = 4  # B: the losses see 2B = 8 rows of T = N / 8 positions
HIDDEN = 4096  # H of the hidden states given to Liger's fused-linear DPO (lm_head weight [V, H])
IGNORE_FRACTION = 0.1  # share of positions with label -100

VOCABS = (32000, 128256, 151936, 256000)
GPU_TOKENS = (4096, 16384, 65536)


@dataclass(frozen=True)
class BenchSet:
    """Shapes, dtypes and repetition rule of one named set.

    Each timed cell runs ``warmup`` untimed repetitions, then ``reps`` timed ones with
    ``reps = clamp(ceil(target_seconds / t_warm), min_reps, max_reps)`` (``t_warm``: the last
    warm-up's time), so cheap cells get more repetitions and expensive ones stay bounded.
    """

    name: str
    device: str  # "cpu" or "cuda"
    op_shapes: tuple[tuple[int, int], ...]  # (N, V) for logps / kl
    loss_shapes: tuple[tuple[int, int], ...]  # (N, V) for the losses, N = 2B * T
    dtypes: tuple[str, ...]
    min_reps: int
    max_reps: int
    target_seconds: float
    warmup: int = 1
    threads: int | None = None  # torch.set_num_threads for the run (None: leave torch's default)
    description: str = ""


SETS: dict[str, BenchSet] = {
    "smoke": BenchSet(
        name="smoke", device="cpu", op_shapes=((64, 512),), loss_shapes=((64, 512),), dtypes=("float32",),
        min_reps=2, max_reps=3, target_seconds=0.0, threads=1,
        description="tiny shapes for the test suite: checks the machinery, not speed (1 thread)"),
    "cpu": BenchSet(
        name="cpu", device="cpu",
        op_shapes=((1024, 32000), (2048, 32000), (1024, 128256)),
        loss_shapes=((1024, 32000),), dtypes=("bfloat16", "float32"),
        min_reps=3, max_reps=10, target_seconds=0.5,
        description="reduced CPU set (chunked torch path vs eager/compile); a few minutes on 2 cores"),
    "gpu": BenchSet(
        name="gpu", device="cuda", op_shapes=tuple(product(GPU_TOKENS, VOCABS)),
        loss_shapes=tuple((16384, v) for v in VOCABS), dtypes=("bfloat16",),
        min_reps=10, max_reps=100, target_seconds=0.25,
        description="full GPU set: tokens 4096/16384/65536 x vocab 32000/128256/151936/256000"),
    "gpu-quick": BenchSet(
        name="gpu-quick", device="cuda",
        op_shapes=((4096, 128256), (16384, 32000), (16384, 128256), (16384, 256000)),
        loss_shapes=((16384, 128256),), dtypes=("bfloat16",),
        min_reps=10, max_reps=50, target_seconds=0.15,
        description="a subset of the GPU set that fits a few minutes, torch.compile included"),
}


def shapes_for(bench_set: BenchSet, op: str) -> tuple[tuple[int, int], ...]:
    """The (N, V) shapes of ``op`` in ``bench_set``."""
    if op in OPS:
        return bench_set.op_shapes
    if op in LOSSES:
        return bench_set.loss_shapes
    raise ValueError(f"unknown op {op!r}; expected one of {ALL_OPS}")


def loss_layout(tokens: int) -> tuple[int, int]:
    """``(rows, T)`` of a loss cell with ``tokens = N`` positions: ``rows = 2 * PAIRS``."""
    rows = 2 * PAIRS
    if tokens % rows:
        raise ValueError(f"loss cells need N divisible by 2B = {rows}, got N = {tokens}")
    return rows, tokens // rows
