"""What every kernel launcher shares: argument checks, the tile configuration, row strides, the device to
launch on, and the ``triton.compile`` inputs of each kernel variant built from one table per kernel.

A launcher only checks its arguments, allocates, picks the grid and launches: tensors in, tensors out, no
host synchronisation. Errors name the argument (``TypeError`` for a wrong kind or dtype, ``ValueError``
for a wrong shape, layout, device or value).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import triton

from tidpo._validation import LABEL_DTYPES, check_int

__all__ = [
    "LABEL_DTYPES",
    "LOGITS_DTYPES",
    "check_ignore_index",
    "check_kernel_logits",
    "check_per_position",
    "check_runnable",
    "compile_entries",
    "is_interpreted",
    "on_device",
    "row_strides",
    "rows_overlap",
    "tile_config",
]

#: Logits dtypes the kernels read (each input in its own dtype; the math is fp32).
LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Float dtypes accepted for per-position inputs that are read as fp32 (upstream gradients, weights).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                torch.int32: "i32"}


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def check_kernel_logits(logits, name: str = "logits") -> None:
    """A logits tensor the kernels can read in place: fp32/fp16/bf16, ``[N, V]`` or ``[R, T, V]``, unit stride
    along V."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {logits.dtype} "
                        "(use backend='torch' for other dtypes)")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [N, V] or [R, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary (last) dimension, got strides "
                         f"{tuple(logits.stride())}; the kernels read rows in place and never copy the logits")


def check_runnable(logits: torch.Tensor, interpreted: bool, name: str = "logits") -> None:
    """Last check (so every other argument error shows on CPU too): can the kernels run here?"""
    if logits.device.type != "cuda" and not (interpreted and logits.device.type == "cpu"):
        raise ValueError(f"{name} is on {logits.device}; the Triton kernels need CUDA tensors "
                         "(or CPU tensors with TRITON_INTERPRET=1 set before tidpo.kernels is imported)")


def check_per_position(x, logits: torch.Tensor, name: str, dtypes, kind: str, logits_name: str = "logits") -> None:
    """``x`` holds one value per position of ``logits`` (its shape without V), one of ``dtypes``, same device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {kind} ({allowed}), got {x.dtype}")
    if tuple(x.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {logits_name} shape {tuple(logits.shape)} "
                         f"without its vocabulary dimension ({tuple(logits.shape[:-1])})")
    if x.device != logits.device:
        raise ValueError(f"{name} is on {x.device} but {logits_name} is on {logits.device}")


def check_ignore_index(ignore_index) -> int:
    return check_int(ignore_index, "ignore_index")


def tile_config(vocab: int, max_block: int, values_per_thread: int, block_v: int | None = None,
                num_warps: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: ``BLOCK_V = min(next_pow2(V), max_block)`` (at least 16) and enough warps that
    each thread holds ``values_per_thread`` values of a tile (1 to 16 warps); ``block_v`` / ``num_warps``
    override them (tests, tuning)."""
    block = max(min(triton.next_power_of_2(max(int(vocab), 1)), max_block), 16)
    warps = max(1, min(16, block // (32 * values_per_thread)))
    if block_v is not None:
        if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}")
        block = block_v
    if num_warps is not None:
        if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
        warps = num_warps
    return block, warps


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------


def on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device, which may be another one)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """``(T, stride_r, stride_t)`` so that position ``pid`` is row ``(pid // T, pid % T)``."""
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def rows_overlap(x: torch.Tensor) -> bool:
    """Whether two positions of ``x`` share memory (e.g. an ``expand``-ed tensor)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim() - 1) if x.shape[d] > 1)
    extent = x.shape[-1]  # elements spanned by one position (unit stride along V)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


# ----------------------------------------------------------------------------------------------
# compile-only inputs
# ----------------------------------------------------------------------------------------------


def compile_entries(fn, arg_types: dict[str, str], variants: dict[str, tuple], *, dtype_roles: dict[str, tuple],
                    constexprs: dict, options: dict, name: str) -> list[dict]:
    """``triton.compile`` inputs for every variant of ``fn``, from ONE table of its arguments.

    Args:
        fn: the ``JITFunction``.
        arg_types: every parameter of ``fn`` in order -> its Triton type, ``"constexpr"``, or a role in braces
            (``"*{logits}"``) filled per variant from ``dtype_roles``.
        variants: constexpr flag -> the values it takes (all combinations are compiled).
        dtype_roles: role -> the torch dtype combinations it takes, zipped with the other roles: e.g.
            ``{"p": (fp32, bf16), "q": (fp32, fp32)}`` gives two variants.
        constexprs: the constexpr values every variant shares (``BLOCK_V``).
        options: ``triton.compile`` options, as the launcher passes them.
        name: the kernel's name in the entries' ``name``.

    Returns:
        Entries with ``name``, ``fn``, ``signature``, ``constexprs``, ``attrs`` (16-byte aligned pointers, as
        the JIT specialises torch allocations) and ``options``; use as ``triton.compile(ASTSource(e["fn"],
        e["signature"], e["constexprs"], e["attrs"]), target=..., options=e["options"])``.

    Raises:
        ValueError: ``arg_types`` does not list exactly the kernel's parameters, in order.
    """
    if list(arg_types) != list(fn.arg_names):
        raise ValueError(f"{name}: the argument table {list(arg_types)} does not match the kernel's parameters "
                         f"{list(fn.arg_names)}")
    roles = list(dtype_roles)
    combos = list(zip(*dtype_roles.values(), strict=True))
    pointers = [i for i, ty in enumerate(arg_types.values()) if ty.startswith("*")]
    aligned = [["tt.divisibility", 16]]
    out = []
    for dtypes in combos:
        fill = {role: TRITON_DTYPE[dtype] for role, dtype in zip(roles, dtypes, strict=True)}
        signature = {arg: ty.format(**fill) for arg, ty in arg_types.items()}
        for flags in itertools.product(*variants.values()):
            values = dict(zip(variants, flags, strict=True))
            label = ",".join([*fill.values(), *(f"{k}={v}" for k, v in values.items())])
            out.append({"name": f"{name}[{label}]", "fn": fn, "signature": signature,
                        "constexprs": {**constexprs, **values}, "attrs": {(i,): aligned for i in pointers},
                        "options": options})
    return out
