"""Benchmark cells: inputs, the four providers, the three modes, bytes formulas, agreement check.

Shared by ``python -m benchmarks.run``, the pytest-benchmark suite (``benchmarks/test_bench_*.py``)
and the CPU memory worker (``benchmarks.memory_cpu``), so every path times the same code.

Providers
---------
- ``tidpo``: the public API (``tidpo.token_logps``, ``tidpo.token_kl``, ``tidpo.dpo_loss``, ...) with
  the default backend (``auto``: the fused Triton kernels on CUDA, the chunked torch path on CPU;
  the backend used is recorded per cell).
- ``eager``: :mod:`benchmarks.eager`, PyTorch eager as TRL-style trainers compute it.
- ``compile``: ``torch.compile(<the eager function>, fullgraph=True, dynamic=False)``: one static graph
  per (op, shape, dtype), what a user with fixed shapes gets (see :func:`compiled`); the first
  forward + backward of a group is recorded as ``compile_seconds`` (it includes the compilation unless
  that shape was already compiled in this process, e.g. by the agreement check). A failure is recorded,
  never dropped.
- ``liger``: Liger-Kernel, optional (CUDA only). ``logps``: ``-LigerCrossEntropyLoss(reduction="none",
  ignore_index=-100)(logits, labels)``; ``tis_dpo``: those per-token values with the eager TIS-DPO formula
  (weights multiply the per-token log-ratios); ``dpo``: ``LigerFusedLinearDPOLoss`` from hidden states
  ``[2B, T, H]`` (``H = 4096``) and an lm_head weight ``[V, H]`` (both require grad), with
  ``use_ref_model=False`` (it takes no precomputed reference log-probs): it includes the lm_head matmul
  and its gradient, so it is *not* like-for-like. No Liger op computes the full-vocab KL from logits,
  so ``kl``, ``tdpo2`` and ``ti_dpo`` have no Liger cell. Liger's cross-entropy writes the gradient
  into the logits buffer during its forward, so the Liger cells run on their own copy of the logits
  (its values become gradients after the first call; finite, and the timing does not depend on them);
  its "fwd" therefore already contains the gradient computation, and so does the fused-linear DPO's.

Modes
-----
The policy logits (and Liger's hidden states / weight) require grad, so every forward records the
autograd graph as in training. With ``out`` the op's output (``[N]`` per-token values, upstream
gradient ``g ~ N(0, 1)``, fp32, fixed) or the scalar loss:

- ``fwd``: time ``out = forward()``.
- ``bwd``: time ``out.backward(g)`` (losses: ``loss.backward()``) alone. The forward that builds a
  fresh graph runs in an untimed setup before each repetition (pytest-benchmark: ``pedantic`` with
  ``setup``), and the gradients are reset to ``None`` there, so no repetition accumulates into an
  existing ``.grad``.
- ``full``: time forward + backward together.

Outputs of a repetition are released in the next untimed setup, not inside the timed region.

Bytes that must move (``s`` bytes per logits element, ``N`` positions, ``V`` vocabulary; logits read
or gradients written once per pass, per-position vectors neglected): see :data:`BYTES_FACTOR`.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks import eager
from benchmarks.memory_cpu import dtype_str, to_dtype
from benchmarks.shapes import ALL_OPS, HIDDEN, IGNORE_FRACTION, MODES, OPS, PROVIDERS, loss_layout

IGNORE_INDEX = -100
BETA = eager.BETA
ALPHA = eager.ALPHA

# bytes = factor * s * N * V (s = bytes per logits element).
BYTES_FACTOR: dict[str, dict[str, int]] = {
    # read the logits (fwd); read the logits, write the gradient (bwd)
    "logps": {"fwd": 1, "bwd": 2, "full": 3},
    # gradient w.r.t. q (policy) only, p = reference logits without grad: read p and q (fwd);
    # read p and q, write dq (bwd)
    "kl": {"fwd": 2, "bwd": 3, "full": 5},
    # DPO / TIS-DPO with precomputed ref_logps: the policy log-probs, as logps
    "dpo": {"fwd": 1, "bwd": 2, "full": 3},
    "tis_dpo": {"fwd": 1, "bwd": 2, "full": 3},
    # TDPO2 / TI-DPO with ref_logits: logps of the policy logits + KL(ref || policy) over the same policy
    # logits + the reference log-probs (one more read of the reference logits, forward only):
    # fwd 1 + 2 + 1, bwd 2 + 3, full 9
    "tdpo2": {"fwd": 4, "bwd": 5, "full": 9},
    "ti_dpo": {"fwd": 4, "bwd": 5, "full": 9},
}

BYTES_EXPLANATION: dict[str, str] = {
    "logps": "fwd reads the logits (s*N*V); bwd reads the logits and writes the gradient (2*s*N*V); "
             "full = fwd + bwd = 3*s*N*V",
    "kl": "gradient w.r.t. q (policy) only, p = reference logits (no grad): fwd reads p and q (2*s*N*V); "
          "bwd reads p and q and writes dq (3*s*N*V); full = 5*s*N*V",
    "dpo": "with precomputed ref_logps the only full-vocab work is the policy log-probs: as logps "
           "(1 / 2 / 3 * s*N*V)",
    "tis_dpo": "with precomputed ref_logps (weights are per-token constants): as logps (1 / 2 / 3 * s*N*V)",
    "tdpo2": "with ref_logits: policy logps (fwd 1, bwd 2) + KL(ref||policy) over the same policy logits "
             "(fwd 2, bwd 3) + reference log-probs (fwd 1: one more read of the reference logits): "
             "fwd 4*s*N*V, bwd 5*s*N*V, full 9*s*N*V",
    "ti_dpo": "as tdpo2 (gamma = 0: no triplet term): fwd 4*s*N*V, bwd 5*s*N*V, full 9*s*N*V",
}

OP_DESCRIPTION: dict[str, str] = {
    "logps": "tidpo.token_logps(logits [N, V], labels [N]) -> [N]",
    "kl": "tidpo.token_kl(ref_logits, policy_logits, labels) -> [N], KL(ref || policy), grad w.r.t. policy",
    "dpo": "tidpo.dpo_loss(policy_logits [2B, T, V], labels, ref_logps=..., beta=0.1).loss",
    "tdpo2": "tidpo.tdpo_loss(policy_logits, ref_logits, labels, beta=0.1, alpha=0.5, variant=2).loss",
    "tis_dpo": "tidpo.tis_dpo_loss(policy_logits, labels, weights, ref_logps=..., beta=0.1).loss",
    "ti_dpo": "tidpo.ti_dpo_loss(policy_logits, ref_logits, labels, weights, beta=0.1, alpha=0.5, gamma=0.0).loss",
}

PROVIDER_DESCRIPTION: dict[str, str] = {
    "tidpo": "tidpo public API, backend auto (Triton on CUDA, chunked torch on CPU)",
    "eager": "PyTorch eager as TRL computes it (benchmarks/eager.py): selective_log_softmax row loop, "
             "fp32 softmax/log_softmax KL, masked sums, loss formula",
    "compile": "torch.compile(eager function, fullgraph=True, dynamic=False): one static graph per (op, shape, "
               "dtype)",
    "liger": "Liger-Kernel (optional, CUDA only): LigerCrossEntropyLoss(reduction='none') for logps "
             "(x weights for TIS-DPO); LigerFusedLinearDPOLoss from hidden states for DPO (includes the "
             "lm_head matmul: not like-for-like); no KL op",
}

LIGER_NO_KL = ("no Liger-Kernel op computes the per-position full-vocab KL from logits "
               "(LigerKLDIVLoss takes log-probabilities, so the log-softmax would be eager)")
LIGER_DPO_NOTE = ("LigerFusedLinearDPOLoss from hidden states [2B, T, 4096] and lm_head weight [V, 4096]: "
                  "includes the lm_head matmul and its gradients (not like-for-like); use_ref_model=False; "
                  "computes the gradients inside its forward")
LIGER_CE_NOTE = ("LigerCrossEntropyLoss(reduction='none'): writes the gradient into (a copy of) the logits "
                 "during the forward, so 'fwd' already contains the gradient computation")


def bytes_moved(op: str, mode: str, tokens: int, vocab: int, dtype) -> int:
    """Bytes that must move for one call: ``BYTES_FACTOR[op][mode] * s * N * V``."""
    return BYTES_FACTOR[op][mode] * to_dtype(dtype).itemsize * tokens * vocab


def bytes_formula(op: str, mode: str) -> str:
    return f"{BYTES_FACTOR[op][mode]}*s*N*V"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- inputs

def uses_ref_logits(op: str) -> bool:
    return op in ("kl", "tdpo2", "ti_dpo")


def make_inputs(op: str, tokens: int, vocab: int, dtype, device="cpu", seed: int = 0) -> dict:
    """Seeded inputs of one cell; the policy logits require grad, everything else is constant.

    ``logps``/``kl``: logits ``[N, V]``, labels ``[N]``, upstream gradient ``grad_out`` ``[N]``; losses:
    ``[2B, T, V]`` / ``[2B, T]``, plus ``ref_logps`` (dpo, tis_dpo; fp32, negative), ``weights``
    (tis_dpo, ti_dpo; fp32 in [0.5, 1.5)), ``ref_logits`` (kl, tdpo2, ti_dpo; no grad). About
    ``IGNORE_FRACTION`` of the labels are -100. Logits are ``N(0, 2^2)`` written in place in their dtype.
    """
    if op not in ALL_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {ALL_OPS}")
    dtype, device = to_dtype(dtype), torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if op in OPS:
        shape, label_shape = (tokens, vocab), (tokens,)
    else:
        rows, length = loss_layout(tokens)
        shape, label_shape = (rows, length, vocab), (rows, length)
    labels = torch.randint(0, vocab, label_shape, generator=gen, device=device)
    labels[torch.rand(label_shape, generator=gen, device=device) < IGNORE_FRACTION] = IGNORE_INDEX
    policy = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen).requires_grad_(True)
    inputs = {"op": op, "policy": policy, "labels": labels}
    if uses_ref_logits(op):
        inputs["ref_logits"] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 2.0, generator=gen)
    if op in ("dpo", "tis_dpo"):
        inputs["ref_logps"] = -1.0 - 5.0 * torch.rand(label_shape, generator=gen, device=device)
    if op in ("tis_dpo", "ti_dpo"):
        inputs["weights"] = 0.5 + torch.rand(label_shape, generator=gen, device=device)
    if op in OPS:
        inputs["grad_out"] = torch.randn(label_shape, generator=gen, device=device)
    return inputs


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------- providers

class Unavailable(Exception):
    """A provider cannot run this cell here; the message is the recorded reason."""


def liger_version() -> str | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - importable but without metadata
        return "unknown"


def provider_unavailable(op: str, provider: str, device) -> str | None:
    """Why ``provider`` cannot run ``op`` on ``device`` (without importing anything heavy), or None."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if provider != "liger":
        return None
    if uses_ref_logits(op):
        return LIGER_NO_KL
    if liger_version() is None:
        return "liger-kernel is not installed (optional: pip install liger-kernel)"
    if torch.device(device).type != "cuda":
        return "liger needs CUDA (its kernels are Triton GPU kernels)"
    return None


@dataclass
class Runner:
    """One provider's forward and backward on one cell's inputs.

    ``forward()`` returns the op's per-token output or the scalar loss; ``backward(out)`` propagates
    the fixed upstream gradient (ops) or ``1`` (losses). ``leaves`` are the tensors that receive
    gradients (reset to None before each repetition); ``grad_leaf`` is the one compared by the
    agreement check (the policy logits, or their copy for Liger).
    """

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    leaves: list[torch.Tensor]
    backend: str
    note: str = ""
    like_for_like: bool = True
    compiled: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def grad_leaf(self) -> torch.Tensor:
        return self.leaves[0]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


_COMPILED: dict = {}


def compiled(fn):
    """``torch.compile(fn, fullgraph=True, dynamic=False)``, one wrapper per eager function.

    ``dynamic=False``: every (shape, dtype) gets its own static graph, as a user with fixed shapes gets
    (no automatic dynamic shapes after the first recompile). Graphs are cached per shape, so the
    agreement check, the three modes and a repeated shape reuse them. The recompile limit is raised
    and made fatal: beyond it torch.compile would otherwise fall back to eager without saying so.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 256)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
    config.fail_on_recompile_limit_hit = True
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def tidpo_backend(op: str, inputs: dict) -> str:
    """The backend ``auto`` picks for this cell (``logps=..,kl=..`` for the losses with a KL term)."""
    from tidpo.ops.backend import resolve_backend

    policy = inputs["policy"]
    if op == "logps" or op in ("dpo", "tis_dpo"):
        return resolve_backend(None, policy, op="logps")
    if op == "kl":
        return resolve_backend(None, policy, op="kl")
    return f"logps={resolve_backend(None, policy, op='logps')},kl={resolve_backend(None, policy, op='kl')}"


def _op_backward(grad_out: torch.Tensor):
    def backward(out: torch.Tensor) -> None:
        out.backward(grad_out.to(out.dtype))

    return backward


def _loss_backward(out: torch.Tensor) -> None:
    out.backward()


def _tidpo_fn(op: str, x: dict):
    import tidpo

    p, y = x["policy"], x["labels"]
    if op == "logps":
        return lambda: tidpo.token_logps(p, y, IGNORE_INDEX)
    if op == "kl":
        return lambda: tidpo.token_kl(x["ref_logits"], p, y, IGNORE_INDEX)
    if op == "dpo":
        return lambda: tidpo.dpo_loss(p, y, ref_logps=x["ref_logps"], beta=BETA).loss
    if op == "tdpo2":
        return lambda: tidpo.tdpo_loss(p, x["ref_logits"], y, beta=BETA, alpha=ALPHA, variant=2).loss
    if op == "tis_dpo":
        return lambda: tidpo.tis_dpo_loss(p, y, x["weights"], ref_logps=x["ref_logps"], beta=BETA).loss
    return lambda: tidpo.ti_dpo_loss(p, x["ref_logits"], y, x["weights"], beta=BETA, alpha=ALPHA, gamma=0.0).loss


EAGER_FUNCTIONS = {
    "logps": (eager.token_logps, ("policy", "labels")),
    "kl": (eager.token_kl, ("ref_logits", "policy", "labels")),
    "dpo": (eager.dpo_loss, ("policy", "labels", "ref_logps")),
    "tdpo2": (eager.tdpo2_loss, ("policy", "ref_logits", "labels")),
    "tis_dpo": (eager.tis_dpo_loss, ("policy", "labels", "weights", "ref_logps")),
    "ti_dpo": (eager.ti_dpo_loss, ("policy", "ref_logits", "labels", "weights")),
}


def _liger_runner(op: str, x: dict, backward) -> Runner:
    if op in ("logps", "tis_dpo"):
        from liger_kernel.transformers import LigerCrossEntropyLoss

        ce = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)
        own = x["policy"].detach().clone().requires_grad_(True)  # Liger overwrites it with the gradient
        labels = x["labels"]
        vocab = own.shape[-1]
        if op == "logps":
            def forward():
                return -ce(own, labels)
        else:
            mask = labels != IGNORE_INDEX

            def forward():
                logps = -ce(own.view(-1, vocab), labels.reshape(-1)).view(labels.shape)
                return eager.tis_dpo_from_logps(logps, mask, x["weights"], x["ref_logps"], BETA)
        return Runner(forward, backward, [own], backend="liger", note=LIGER_CE_NOTE)
    if op == "dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        policy = x["policy"]
        rows, length, vocab = policy.shape
        gen = torch.Generator(device=policy.device).manual_seed(1)
        hidden = torch.empty(rows, length, HIDDEN, dtype=policy.dtype, device=policy.device).normal_(
            generator=gen).requires_grad_(True)
        weight = torch.empty(vocab, HIDDEN, dtype=policy.dtype, device=policy.device).normal_(
            0.0, HIDDEN ** -0.5, generator=gen).requires_grad_(True)
        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False)
        labels = x["labels"]

        def forward():
            out = loss_fn(weight, hidden, labels)
            return out[0] if isinstance(out, tuple) else out
        return Runner(forward, _loss_backward, [hidden, weight], backend="liger", note=LIGER_DPO_NOTE,
                      like_for_like=False, extra={"hidden": hidden, "weight": weight})
    raise Unavailable(LIGER_NO_KL)


def make_runner(op: str, provider: str, inputs: dict) -> Runner:
    """Build ``provider``'s runner for ``op`` on ``inputs`` (see the module docstring).

    Raises:
        Unavailable: the provider cannot run here (the message is the reason to record).
    """
    device = inputs["policy"].device
    reason = provider_unavailable(op, provider, device)
    if reason is not None:
        raise Unavailable(reason)
    backward = _op_backward(inputs["grad_out"]) if op in OPS else _loss_backward
    if provider == "tidpo":
        return Runner(_tidpo_fn(op, inputs), backward, [inputs["policy"]], backend=tidpo_backend(op, inputs))
    if provider == "liger":
        return _liger_runner(op, inputs, backward)
    fn, names = EAGER_FUNCTIONS[op]
    args = tuple(inputs[n] for n in names)
    if provider == "compile":
        compiled_fn = compiled(fn)
        return Runner(lambda: compiled_fn(*args), backward, [inputs["policy"]], backend="inductor", compiled=True)
    return Runner(lambda: fn(*args), backward, [inputs["policy"]], backend="eager")


# ----------------------------------------------------------------------------------------- modes

def mode_callables(runner: Runner, mode: str, device) -> tuple[Callable[[], dict], Callable[[dict], None]]:
    """``(setup, step)`` of one mode: ``setup()`` is untimed and returns the state ``step`` uses.

    ``step`` does not synchronise (CUDA timing brackets it with events); use :func:`synced` where the
    caller times with a host clock (pytest-benchmark).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    if mode == "bwd":
        def setup() -> dict:
            runner.clear_grads()
            out = runner.forward()
            sync(device)
            return {"out": out}

        def step(state: dict) -> None:
            runner.backward(state["out"])
        return setup, step

    def setup() -> dict:
        runner.clear_grads()
        sync(device)
        return {}

    if mode == "fwd":
        def step(state: dict) -> None:
            state["out"] = runner.forward()
    else:
        def step(state: dict) -> None:
            out = runner.forward()
            runner.backward(out)
            state["out"] = out
    return setup, step


def synced(step: Callable[[dict], None], device) -> Callable[[dict], None]:
    def run(state: dict) -> None:
        step(state)
        sync(device)

    return run


def warm_compile(runner: Runner, device) -> float:
    """Run forward + backward once (compiles both graphs for ``compile``); returns the seconds taken."""
    runner.clear_grads()
    sync(device)
    t0 = time.perf_counter()
    out = runner.forward()
    runner.backward(out)
    sync(device)
    seconds = time.perf_counter() - t0
    del out
    runner.clear_grads()
    return seconds


# ------------------------------------------------------------------------------- memory estimates

def estimated_extra_bytes(op: str, provider: str, mode: str, tokens: int, vocab: int, dtype) -> int:
    """A rough upper estimate of the bytes a cell needs beyond its inputs (to skip what cannot fit).

    Gradient ``s*N*V`` (bwd/full) plus provider temporaries: tidpo a few chunks (<= 512 MiB);
    eager ``3*s*N*V`` for the log-probs and ``8*4*N*V`` for the fp32 KL; compile half of eager;
    Liger its copy of the logits (cross-entropy) or the lm_head weight, hidden states and their grads.
    """
    s = to_dtype(dtype).itemsize
    nv = tokens * vocab
    grad = 0 if mode == "fwd" else s * nv
    logps_part = 0 if op == "kl" else 3 * s * nv
    kl_part = 8 * 4 * nv if uses_ref_logits(op) else 0
    if provider == "tidpo":
        temps = 512 * 2**20
    elif provider == "eager":
        temps = logps_part + kl_part
    elif provider == "compile":
        temps = (logps_part + kl_part) // 2
    elif op == "dpo":  # liger fused linear: weight + grad, hidden + grad, chunk logits
        grad = 0
        temps = 2 * s * (vocab * HIDDEN + tokens * HIDDEN) + 4 * vocab * 2 * 1024
    else:
        temps = 2 * s * nv  # own copy of the logits (+ the reduction='none' backward product)
    return int(grad + temps)


# ---------------------------------------------------------------------------------- agreement check

CHECK_TOKENS, CHECK_VOCAB = 64, 512


def _value_and_grad(runner: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    runner.clear_grads()
    out = runner.forward()
    runner.backward(out)
    value = out.detach().double().clone()
    grad = runner.grad_leaf.grad.detach().double().clone()
    runner.clear_grads()
    return value, grad


def _tidpo_dpo_from_hidden(inputs: dict, hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    """tidpo's DPO on ``hidden @ weight.T`` with zero reference log-probs: what Liger's DPO computes."""
    import tidpo

    h = hidden.detach().clone().requires_grad_(True)
    logits = h @ weight.detach().T
    loss = tidpo.dpo_loss(logits, inputs["labels"], ref_logps=torch.zeros_like(inputs["ref_logps"]),
                          beta=BETA).loss
    loss.backward()
    return loss.detach().double(), h.grad.detach().double()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def check_agreement(op: str, provider: str, device="cpu", *, tokens: int = CHECK_TOKENS, vocab: int = CHECK_VOCAB,
                    rtol: float = 1e-4, runner_factory=None) -> dict:
    """Compare ``provider`` with tidpo on a tiny float32 cell: output/loss and the logits gradient.

    Passes when ``max|value - tidpo| <= rtol * (1 + max|tidpo value|)`` and
    ``max|grad - tidpo grad| <= rtol * max|tidpo grad| + 1e-6``. ``runner_factory(op, provider, inputs)``
    replaces :func:`make_runner` (tests use it to prove the check fails on a wrong baseline).
    Returns a dict with ``ok`` (True / False / None when the provider cannot run: see ``reason``).
    """
    factory = runner_factory or make_runner
    result = {"op": op, "provider": provider, "dtype": "float32", "N": tokens, "V": vocab, "rtol": rtol}
    reason = provider_unavailable(op, provider, device)
    if reason is not None:
        return {**result, "ok": None, "reason": reason}
    inputs = make_inputs(op, tokens, vocab, torch.float32, device, seed=123)
    try:
        ours_value, ours_grad = _value_and_grad(make_runner(op, "tidpo", inputs))
        runner = factory(op, provider, inputs)
        value, grad = _value_and_grad(runner)
        if op == "dpo" and provider == "liger":  # compare with tidpo on the same hidden states / weight
            ours_value, ours_grad = _tidpo_dpo_from_hidden(inputs, runner.extra["hidden"], runner.extra["weight"])
    except Unavailable as exc:
        return {**result, "ok": None, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded, e.g. a torch.compile failure
        return {**result, "ok": None, "reason": f"failed: {type(exc).__name__}: {str(exc)[:400]}"}
    value_err, grad_err = _max_err(value, ours_value), _max_err(grad, ours_grad)
    value_tol = rtol * (1.0 + float(ours_value.abs().max()))
    grad_tol = rtol * float(ours_grad.abs().max()) + 1e-6
    ok = value.shape == ours_value.shape and value_err <= value_tol and grad_err <= grad_tol
    return {**result, "ok": bool(ok), "value_max_err": value_err, "value_tol": value_tol,
            "grad_max_err": grad_err, "grad_tol": grad_tol,
            "reason": "" if ok else "disagrees with tidpo beyond the tolerance"}


# ------------------------------------------------------------------------------------ group cache

class GroupCache:
    """Keeps the inputs and runners of one (op, N, V, dtype, device) group alive across its cells.

    Cells of a group share inputs (allocation of multi-GB logits is not free) and one compiled
    function per provider (compiled once, reused by fwd / bwd / full). Moving to another group frees
    the previous one first.
    """

    def __init__(self) -> None:
        self.key = None
        self.inputs: dict | None = None
        self.runners: dict[str, Runner | Exception] = {}
        self.compile_seconds: dict[str, float] = {}

    def inputs_for(self, op: str, tokens: int, vocab: int, dtype, device) -> dict:
        key = (op, tokens, vocab, dtype_str(dtype), str(torch.device(device)))
        if key != self.key:
            self.clear()
            self.inputs = make_inputs(op, tokens, vocab, dtype, device)
            self.key = key
        return self.inputs

    def runner_for(self, provider: str) -> Runner:
        """The provider's runner, built and warmed once (raises the recorded exception again)."""
        if self.inputs is None:
            raise RuntimeError("inputs_for() first")
        if provider not in self.runners:
            # Only one runner per group at a time (Liger's copies of the logits, compiled graphs).
            self.runners.clear()
            try:
                runner = make_runner(self.inputs["op"], provider, self.inputs)
                seconds = warm_compile(runner, self.inputs["policy"].device)
                if runner.compiled:
                    self.compile_seconds[provider] = seconds
                self.runners[provider] = runner
            except Exception as exc:  # noqa: BLE001 - recorded per cell by the caller
                self.runners[provider] = exc
        found = self.runners[provider]
        if isinstance(found, Exception):
            raise found
        return found

    def clear(self) -> None:
        self.runners.clear()
        self.inputs = None
        self.key = None
        self.compile_seconds.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
