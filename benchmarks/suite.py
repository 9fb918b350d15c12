"""The pytest-benchmark side of the suite: cell parameters and one cell's measurement.

``benchmarks/test_bench_ops.py`` and ``benchmarks/test_bench_losses.py`` parametrise over
:func:`cell_params`; each cell runs :func:`run_cell`, which uses the same inputs, providers, modes and
bytes formulas as ``python -m benchmarks.run`` (:mod:`benchmarks.cases`). Ids read
``<set>-<op>-<mode>-<provider>-<dtype>-N<N>-V<V>`` with ``<set>`` one of ``smoke``, ``cpu``, ``gpu``,
so ``-k cpu`` selects the reduced CPU set, ``-k gpu`` the GPU set (skipped without CUDA) and
``-k smoke`` the tiny one.

``bwd`` cells use ``benchmark.pedantic`` with a ``setup`` that rebuilds the forward graph (untimed)
before every round; all modes use the same ``setup`` / ``step`` pair as the runner. pytest-benchmark
times with a host clock, so on CUDA the step synchronises before returning. The number of rounds
follows the set's rule (one timed warm-up decides it); ``extra_info`` records the bytes formula,
GB/s of the median, the tidpo backend and, on CUDA, the extra peak memory.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases, timing
from benchmarks.shapes import MODES, PROVIDERS, SETS, shapes_for

SUITE_SETS = ("smoke", "cpu", "gpu")  # gpu-quick is a subset of gpu


def cell_params(ops: tuple[str, ...], sets: tuple[str, ...] = SUITE_SETS) -> list:
    """``pytest.param(set, op, mode, provider, dtype, N, V)``, grouped so consecutive cells share inputs."""
    params = []
    for set_name in sets:
        bench = SETS[set_name]
        for op in ops:
            for tokens, vocab in shapes_for(bench, op):
                for dtype in bench.dtypes:
                    for provider in PROVIDERS:
                        for mode in MODES:
                            params.append(pytest.param(
                                set_name, op, mode, provider, dtype, tokens, vocab,
                                id=f"{set_name}-{op}-{mode}-{provider}-{dtype}-N{tokens}-V{vocab}"))
    return params


PARAM_NAMES = "set_name,op,mode,provider,dtype,tokens,vocab"


def run_cell(benchmark, cache: cases.GroupCache, set_name: str, op: str, mode: str, provider: str, dtype: str,
             tokens: int, vocab: int) -> None:
    bench = SETS[set_name]
    device = torch.device(bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"set {set_name!r} needs CUDA")
    reason = cases.provider_unavailable(op, provider, device)
    if reason:
        pytest.skip(reason)
    need = cases.estimated_extra_bytes(op, provider, mode, tokens, vocab, dtype)
    need += (2 if cases.uses_ref_logits(op) else 1) * tokens * vocab * cases.to_dtype(dtype).itemsize
    available = timing.available_memory_bytes(device) + (cases.input_bytes(cache.inputs) if cache.inputs else 0)
    if need > 0.9 * available:
        pytest.skip(f"estimated to need {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
    threads = torch.get_num_threads()
    if bench.threads:
        torch.set_num_threads(bench.threads)
    try:
        cache.inputs_for(op, tokens, vocab, dtype, device)
        try:
            runner = cache.runner_for(provider)
        except cases.Unavailable as exc:
            pytest.skip(str(exc))
        except Exception as exc:  # noqa: BLE001 - the same rule as the runner: record, do not hide
            what = "torch.compile failed" if provider == "compile" else "could not run"
            pytest.skip(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        setup, step = cases.mode_callables(runner, mode, device)
        last_ms = 0.0
        for _ in range(max(1, bench.warmup)):
            last_ms = timing.time_once(setup, step, device)
        rounds = timing.choose_reps(last_ms, min_reps=bench.min_reps, max_reps=bench.max_reps,
                                    target_seconds=bench.target_seconds)
        nbytes = cases.bytes_moved(op, mode, tokens, vocab, dtype)
        benchmark.group = f"{set_name}-{op}-{mode}-{dtype}-N{tokens}-V{vocab}"
        benchmark.extra_info.update(op=op, mode=mode, provider=provider, dtype=dtype, N=tokens, V=vocab,
                                    bytes=nbytes, bytes_formula=cases.bytes_formula(op, mode),
                                    backend=runner.backend, like_for_like=runner.like_for_like, note=runner.note)
        benchmark.pedantic(cases.synced(step, device), setup=lambda: ((setup(),), {}), rounds=rounds,
                           iterations=1, warmup_rounds=0)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and stats.stats.median > 0:
            benchmark.extra_info["gbs"] = nbytes / stats.stats.median / 1e9
        if device.type == "cuda":
            benchmark.extra_info["extra_peak_bytes"] = timing.cuda_extra_peak(setup, step, runner.clear_grads)
        runner.clear_grads()
    finally:
        torch.set_num_threads(threads)
