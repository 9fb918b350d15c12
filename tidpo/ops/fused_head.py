"""Per-token log-probs and full-vocab KL straight from hidden states and an LM head (:class:`~tidpo.LMHead`).

The logits ``z = head(h)`` exist one bounded tile at a time (``rows x vocab_chunk``, at most
:data:`TILE_ELEMENTS` fp32 values); statistics accumulate online over the vocabulary like an attention output
(a running max ``m`` and sum ``s = sum_v exp(z_v - m)``, rescaled when the max grows), in fp32 (fp64 for fp64
inputs). The matmul operands are rounded to the dtype the materialised head would use (the autocast dtype under
autocast, else that of ``hidden`` and ``weight``) and their products come out in fp32, unrounded (:func:`_matmul`).

Gradients (docs/methods.md §0.1). Every quantity here is a function of per-token scalars of the logits, so the
gradient w.r.t. a hidden state is a vocabulary-weighted sum of head rows, which the forward accumulates in the
same pass (one extra matmul per tile) when the head is frozen (LoRA, a reference):

- ``logp_t = z_y - lse``: ``d logp_t / d h_t = z'_y W_y - sum_v p_v z'_v W_v``, with ``z'_v = dz_v/du_v`` the
  transform's slope (``scale``, times ``1 - tanh^2`` with soft-capping) at ``u = h W^T + b``;
- ``KL(p || q)_t``: ``d/d h^q = sum_v (q_v - p_v) z'^q_v W^q_v`` and
  ``d/d h^p = sum_v p_v (log p_v - log q_v - KL) z'^p_v W^p_v``.

The backward is then a scaling of the saved ``[n, H]`` rows by ``dL/d(value)``: two head matmuls per training
step in all (TRL 1.16's fused head recomputes the logits in its backward: three). When the head's weight or bias
needs a gradient (full fine-tuning), the forward keeps only the per-row statistics and the backward recomputes
each tile for ``dW``, ``db`` and ``dh``.

Ignored positions (``labels == ignore_index``) cost no head work: the valid rows are gathered first, which reads
their number to the host once per call (one synchronisation). They get exactly 0 and a zero gradient.
"""

from __future__ import annotations

import torch

from tidpo._validation import check_int
from tidpo.ops.lm_head import FusedLogits, LMHead

#: Vocabulary entries per tile (the default ``chunk_size`` of the fused ops).
DEFAULT_VOCAB_CHUNK = 4096
#: Most logits in one tile: rows per tile = TILE_ELEMENTS // vocab chunk (16 MiB of fp32 per tile-sized temporary).
TILE_ELEMENTS = 1 << 22


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the materialised head would use: the autocast dtype under autocast."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.result_type(hidden, weight)


def _without_autocast(fn):
    """Run ``fn`` with autocast off on every device: the tiles choose their dtypes explicitly."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: ``torch.mm(..., out_dtype=torch.float32)`` from fp16 / bf16 operands: CUDA, torch >= 2.8.
_CUDA_MM_OUT_DTYPE = torch.__version__ >= "2.8"


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for operands already in the compute dtype, the product in ``out_dtype`` without first rounding it
    to the operands' dtype: tiles are summed over the vocabulary, and rounding every tile's product to bf16
    before the sum would add one bf16 error per tile (32 at V = 128,256) where the materialised head has one.

    On CUDA a half-precision GEMM with an fp32 output; elsewhere the same product from the operands upcast
    (exact: every bf16 / fp16 value is an fp32 value), which is also the fast path on CPUs without bf16 matrix
    units (there torch's bf16 GEMM runs 7x to several hundred times slower than fp32, depending on the layout).
    """
    if a.dtype == out_dtype:
        return a @ b
    if a.is_cuda and _CUDA_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=out_dtype)
    return a.to(out_dtype) @ b.to(out_dtype)


def _rescale(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """``exp(m_old - m_new)``, 0 while both are -inf (a row whose logits so far are all -inf holds nothing)."""
    return torch.where(m_new == -torch.inf, 0.0, torch.exp(m_old - m_new))


def _exp_shifted(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(z - m)`` per row, 0 at -inf entries (also when ``m`` is -inf)."""
    return torch.where(z == -torch.inf, 0.0, torch.exp(z - m.unsqueeze(1)))


class _Tiles:
    """One distribution's logits on a block of rows, tile by tile: ``(z, dz/du, weight tile)``."""

    def __init__(self, rows: torch.Tensor, head: LMHead, dtype: torch.dtype):
        self.rows, self.head, self.dtype = rows.to(dtype), head, dtype
        self.acc = _accumulation_dtype(dtype)

    def tile(self, v0: int, v1: int):
        w = self.head.weight[v0:v1].to(self.dtype)
        z = _matmul(self.rows, w.t(), self.acc)
        if self.head.bias is not None:
            z = z + self.head.bias[v0:v1].to(self.dtype)
        scale, cap = self.head.scale, self.head.softcap
        if scale != 1.0:
            z = z * scale
        if cap is None:
            return z, scale, w
        t = torch.tanh(z / cap)
        return cap * t, scale * (1.0 - t * t), w

    def project(self, coefficients: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``coefficients [n, C] @ w [C, H]``, the coefficients rounded to the compute dtype (as the materialised
        head's gradient is), the product in the accumulation dtype."""
        return _matmul(coefficients.to(self.dtype), w, self.acc)

    def label_rows(self, labels: torch.Tensor) -> torch.Tensor:
        return self.head.weight.index_select(0, labels).to(self.dtype).to(self.acc)


def _at_labels(values, labels: torch.Tensor, v0: int, v1: int, previous: torch.Tensor) -> torch.Tensor:
    """``values[row, labels[row] - v0]`` where the label falls in ``[v0, v1)``, ``previous`` elsewhere."""
    if not isinstance(values, torch.Tensor):
        return previous if isinstance(previous, torch.Tensor) else values
    hit = (labels >= v0) & (labels < v1)
    column = (labels - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
    return torch.where(hit, values.gather(1, column).squeeze(1), previous)


def _blocks(n: int, vocab_chunk: int):
    rows = max(1, TILE_ELEMENTS // vocab_chunk)
    for r0 in range(0, n, rows):
        yield slice(r0, min(r0 + rows, n))


def _vocab_tiles(vocab: int, vocab_chunk: int):
    for v0 in range(0, vocab, vocab_chunk):
        yield v0, min(v0 + vocab_chunk, vocab)


# ------------------------------------------------------------------------------------------------------------
# log-probs


def _logps_forward(tiles: _Tiles, labels: torch.Tensor, vocab_chunk: int, accumulate: bool):
    """``(logp, lse, d logp / d rows or None)`` of one row block."""
    n, acc = labels.numel(), tiles.acc
    m = torch.full((n,), -torch.inf, dtype=acc, device=labels.device)
    s, zy = torch.zeros(n, dtype=acc, device=labels.device), torch.zeros(n, dtype=acc, device=labels.device)
    dzy = torch.zeros(n, dtype=acc, device=labels.device) if tiles.head.softcap is not None else tiles.head.scale
    grad = torch.zeros(n, tiles.head.hidden_size, dtype=acc, device=labels.device) if accumulate else None
    for v0, v1 in _vocab_tiles(tiles.head.vocab_size, vocab_chunk):
        z, dz, w = tiles.tile(v0, v1)
        zy = _at_labels(z, labels, v0, v1, zy)
        dzy = _at_labels(dz, labels, v0, v1, dzy)
        m_new = torch.maximum(m, z.amax(1))
        alpha = _rescale(m, m_new)
        e = _exp_shifted(z, m_new)
        s = s * alpha + e.sum(1)
        if accumulate:
            grad = grad * alpha.unsqueeze(1) + tiles.project(e * dz, w)
        m = m_new
    lse = m + torch.log(s)
    if accumulate:
        dzy = dzy.unsqueeze(1) if isinstance(dzy, torch.Tensor) else dzy
        grad = dzy * tiles.label_rows(labels) - grad / s.unsqueeze(1)
    return zy - lse, lse, grad


def _logps_backward(tiles: _Tiles, labels, lse, g, vocab_chunk: int, grads: dict):
    """Recompute the tiles of one row block: ``dL/dz = g (onehot(y) - p)``, then ``dW``, ``db`` and the rows' grad."""
    n = labels.numel()
    d_rows = torch.zeros(n, tiles.head.hidden_size, dtype=tiles.acc, device=labels.device)
    for v0, v1 in _vocab_tiles(tiles.head.vocab_size, vocab_chunk):
        z, dz, w = tiles.tile(v0, v1)
        gz = -torch.exp(z - lse.unsqueeze(1)) * g.unsqueeze(1)
        hit = (labels >= v0) & (labels < v1)
        column = (labels - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
        gz = gz.scatter_add(1, column, torch.where(hit, g, 0.0).unsqueeze(1))
        _tile_grads(tiles, gz * dz, w, v0, v1, d_rows, grads)
    return d_rows


def _tile_grads(tiles: _Tiles, gu: torch.Tensor, w: torch.Tensor, v0: int, v1: int, d_rows, grads: dict) -> None:
    """From ``dL/du`` on one tile: the rows' gradient, and the head's (``grads["weight"]`` / ``["bias"]``)."""
    d_rows += tiles.project(gu, w)
    if "weight" in grads:
        grads["weight"][v0:v1] += _matmul(gu.t().to(tiles.dtype), tiles.rows, tiles.acc)
    if "bias" in grads:
        grads["bias"][v0:v1] += gu.sum(0)


class FusedTokenLogps(torch.autograd.Function):
    """``(logp, lse)`` of gathered valid rows ``[n, H]`` with labels ``[n]`` under a head (see the module doc)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, rows, weight, bias, labels, scale, softcap, vocab_chunk: int, need_rows: bool,
                need_head: bool, dtype: torch.dtype):
        head = LMHead(weight, bias, scale=scale, softcap=softcap)
        accumulate = need_rows and not need_head
        acc = _accumulation_dtype(dtype)
        n = labels.numel()
        logp = torch.zeros(n, dtype=acc, device=rows.device)
        lse = torch.zeros(n, dtype=acc, device=rows.device)
        saved_grad = torch.zeros(n, head.hidden_size, dtype=acc, device=rows.device) if accumulate else None
        for block in _blocks(n, vocab_chunk):
            out = _logps_forward(_Tiles(rows[block], head, dtype), labels[block], vocab_chunk, accumulate)
            logp[block], lse[block] = out[0], out[1]
            if accumulate:
                saved_grad[block] = out[2]
        ctx.mark_non_differentiable(lse)
        ctx.mode = "saved" if accumulate else ("recompute" if need_head else "none")
        ctx.setup = (scale, softcap, vocab_chunk, dtype, rows.dtype)
        if ctx.mode == "saved":
            ctx.save_for_backward(saved_grad)
        elif ctx.mode == "recompute":
            ctx.save_for_backward(rows, weight, bias, labels, lse)
        return logp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_without_autocast
    def backward(ctx, grad_logp, _grad_lse):
        scale, softcap, vocab_chunk, dtype, rows_dtype = ctx.setup
        none = (None,) * 7
        if ctx.mode == "saved":
            (saved_grad,) = ctx.saved_tensors
            return ((saved_grad * grad_logp.to(saved_grad.dtype).unsqueeze(1)).to(rows_dtype), None, None, None,
                    *none[:-1])
        if ctx.mode == "none":
            return (None, None, None, None, *none[:-1])
        rows, weight, bias, labels, lse = ctx.saved_tensors
        head = LMHead(weight, bias, scale=scale, softcap=softcap)
        grads = _head_grad_buffers(ctx.needs_input_grad[1], ctx.needs_input_grad[2], weight, bias, lse.dtype)
        d_rows = torch.zeros(rows.shape, dtype=lse.dtype, device=rows.device)
        g = grad_logp.to(lse.dtype)
        for block in _blocks(labels.numel(), vocab_chunk):
            d_rows[block] = _logps_backward(_Tiles(rows[block], head, dtype), labels[block], lse[block], g[block],
                                            vocab_chunk, grads)
        return (d_rows.to(rows_dtype) if ctx.needs_input_grad[0] else None, *_head_grads(grads, weight, bias),
                None, *none[:-1])


def _head_grad_buffers(need_weight: bool, need_bias: bool, weight, bias, dtype) -> dict:
    grads = {}
    if need_weight:
        grads["weight"] = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if need_bias and bias is not None:
        grads["bias"] = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    return grads


def _head_grads(grads: dict, weight, bias) -> tuple:
    return (grads["weight"].to(weight.dtype) if "weight" in grads else None,
            grads["bias"].to(bias.dtype) if "bias" in grads else None)


# ------------------------------------------------------------------------------------------------------------
# KL(p || q)


def _kl_forward(p: _Tiles, q: _Tiles, vocab_chunk: int, acc_p: bool, acc_q: bool):
    """``(kl, lse_p, lse_q, d kl / d p rows or None, d kl / d q rows or None)`` of one row block."""
    n, acc, device = p.rows.shape[0], p.acc, p.rows.device
    mp = torch.full((n,), -torch.inf, dtype=acc, device=device)
    mq = mp.clone()
    sp, sq, cross = (torch.zeros(n, dtype=acc, device=device) for _ in range(3))
    hidden_p, hidden_q = p.head.hidden_size, q.head.hidden_size
    # A / B accumulators (module doc): q side: sum e_q z'_q W_q and sum e_p z'_q W_q; p side: sum e_p (zp - zq)
    # z'_p W_p and sum e_p z'_p W_p. Each pair goes through one stacked matmul.
    a_q = torch.zeros(2 * n, hidden_q, dtype=acc, device=device) if acc_q else None
    a_p = torch.zeros(2 * n, hidden_p, dtype=acc, device=device) if acc_p else None
    for v0, v1 in _vocab_tiles(p.head.vocab_size, vocab_chunk):
        zp, dzp, wp = p.tile(v0, v1)
        zq, dzq, wq = q.tile(v0, v1)
        mp_new, mq_new = torch.maximum(mp, zp.amax(1)), torch.maximum(mq, zq.amax(1))
        alpha_p, alpha_q = _rescale(mp, mp_new), _rescale(mq, mq_new)
        ep, eq = _exp_shifted(zp, mp_new), _exp_shifted(zq, mq_new)
        # Entries with p_v = 0 contribute 0 (also against a -inf q logit); p_v > 0 against q_v = 0 gives +inf.
        diff = torch.where(ep > 0, zp - zq, 0.0)
        cross = cross * alpha_p + (ep * diff).sum(1)
        sp, sq = sp * alpha_p + ep.sum(1), sq * alpha_q + eq.sum(1)
        if acc_q:
            rescale = torch.cat([alpha_q, alpha_p]).unsqueeze(1)
            a_q = a_q * rescale + q.project(torch.cat([eq * dzq, ep * dzq]), wq)
        if acc_p:
            a_p = a_p * alpha_p.repeat(2).unsqueeze(1) + p.project(torch.cat([ep * diff * dzp, ep * dzp]), wp)
        mp, mq = mp_new, mq_new
    lse_p, lse_q = mp + torch.log(sp), mq + torch.log(sq)
    ratio = cross / sp
    kl = ratio - lse_p + lse_q
    grad_q = None if not acc_q else a_q[:n] / sq.unsqueeze(1) - a_q[n:] / sp.unsqueeze(1)
    grad_p = None if not acc_p else (a_p[:n] - ratio.unsqueeze(1) * a_p[n:]) / sp.unsqueeze(1)
    return kl, lse_p, lse_q, grad_p, grad_q


def _kl_backward(p: _Tiles, q: _Tiles, kl, lse_p, lse_q, g, vocab_chunk: int, grads_p, grads_q):
    """Recompute the tiles of one row block for the sides whose head needs a gradient (``grads_* is not None``)."""
    n = kl.numel()
    d_p = torch.zeros(n, p.head.hidden_size, dtype=p.acc, device=kl.device) if grads_p is not None else None
    d_q = torch.zeros(n, q.head.hidden_size, dtype=q.acc, device=kl.device) if grads_q is not None else None
    offset = (lse_q - lse_p - kl).unsqueeze(1)
    for v0, v1 in _vocab_tiles(p.head.vocab_size, vocab_chunk):
        zp, dzp, wp = p.tile(v0, v1)
        zq, dzq, wq = q.tile(v0, v1)
        prob_p = _exp_shifted(zp, lse_p)
        if grads_q is not None:
            gz = g.unsqueeze(1) * (_exp_shifted(zq, lse_q) - prob_p)
            _tile_grads(q, gz * dzq, wq, v0, v1, d_q, grads_q)
        if grads_p is not None:
            gz = g.unsqueeze(1) * torch.where(prob_p > 0, prob_p * (zp - zq + offset), 0.0)
            _tile_grads(p, gz * dzp, wp, v0, v1, d_p, grads_p)
    return d_p, d_q


class FusedTokenKL(torch.autograd.Function):
    """``(kl, lse_p, lse_q)`` of gathered valid rows under two heads (see the module doc)."""

    @staticmethod
    @_without_autocast
    def forward(ctx, rows_p, weight_p, bias_p, rows_q, weight_q, bias_q, heads, vocab_chunk: int, needs,
                dtypes):
        (scale_p, cap_p), (scale_q, cap_q) = heads
        head_p = LMHead(weight_p, bias_p, scale=scale_p, softcap=cap_p)
        head_q = LMHead(weight_q, bias_q, scale=scale_q, softcap=cap_q)
        (rows_p_grad, head_p_grad), (rows_q_grad, head_q_grad) = needs
        acc_p, acc_q = rows_p_grad and not head_p_grad, rows_q_grad and not head_q_grad
        acc = _accumulation_dtype(dtypes[0])
        n, device = rows_p.shape[0], rows_p.device
        kl, lse_p, lse_q = (torch.zeros(n, dtype=acc, device=device) for _ in range(3))
        saved_p = torch.zeros(n, head_p.hidden_size, dtype=acc, device=device) if acc_p else None
        saved_q = torch.zeros(n, head_q.hidden_size, dtype=acc, device=device) if acc_q else None
        for block in _blocks(n, vocab_chunk):
            out = _kl_forward(_Tiles(rows_p[block], head_p, dtypes[0]), _Tiles(rows_q[block], head_q, dtypes[1]),
                              vocab_chunk, acc_p, acc_q)
            kl[block], lse_p[block], lse_q[block] = out[:3]
            if acc_p:
                saved_p[block] = out[3]
            if acc_q:
                saved_q[block] = out[4]
        ctx.mark_non_differentiable(lse_p, lse_q)
        ctx.setup = (heads, vocab_chunk, dtypes, rows_p.dtype, rows_q.dtype, acc_p, acc_q, head_p_grad, head_q_grad)
        ctx.save_for_backward(saved_p, saved_q, rows_p, weight_p, bias_p, rows_q, weight_q, bias_q, kl, lse_p, lse_q)
        return kl, lse_p, lse_q

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_without_autocast
    def backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
        heads, vocab_chunk, dtypes, dtype_p, dtype_q, acc_p, acc_q, head_p_grad, head_q_grad = ctx.setup
        saved_p, saved_q, rows_p, weight_p, bias_p, rows_q, weight_q, bias_q, kl, lse_p, lse_q = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g = grad_kl.to(kl.dtype)
        out = [None] * 10
        if acc_p and needs[0]:
            out[0] = (saved_p * g.unsqueeze(1)).to(dtype_p)
        if acc_q and needs[3]:
            out[3] = (saved_q * g.unsqueeze(1)).to(dtype_q)
        if head_p_grad or head_q_grad:
            (scale_p, cap_p), (scale_q, cap_q) = heads
            head_p = LMHead(weight_p, bias_p, scale=scale_p, softcap=cap_p)
            head_q = LMHead(weight_q, bias_q, scale=scale_q, softcap=cap_q)
            grads_p = _head_grad_buffers(needs[1], needs[2], weight_p, bias_p, kl.dtype) if head_p_grad else None
            grads_q = _head_grad_buffers(needs[4], needs[5], weight_q, bias_q, kl.dtype) if head_q_grad else None
            d_p = torch.zeros(rows_p.shape, dtype=kl.dtype, device=kl.device) if head_p_grad else None
            d_q = torch.zeros(rows_q.shape, dtype=kl.dtype, device=kl.device) if head_q_grad else None
            for block in _blocks(kl.numel(), vocab_chunk):
                tiles = (_Tiles(rows_p[block], head_p, dtypes[0]), _Tiles(rows_q[block], head_q, dtypes[1]))
                bp, bq = _kl_backward(*tiles, kl[block], lse_p[block], lse_q[block], g[block], vocab_chunk,
                                      grads_p, grads_q)
                if head_p_grad:
                    d_p[block] = bp
                if head_q_grad:
                    d_q[block] = bq
            if head_p_grad:
                out[0] = d_p.to(dtype_p) if needs[0] else None
                out[1], out[2] = _head_grads(grads_p, weight_p, bias_p)
            if head_q_grad:
                out[3] = d_q.to(dtype_q) if needs[3] else None
                out[4], out[5] = _head_grads(grads_q, weight_q, bias_q)
        return tuple(out)


# ------------------------------------------------------------------------------------------------------------
# entry points (called by tidpo.ops for FusedLogits inputs)


def _valid_rows(logits: FusedLogits, labels: torch.Tensor, ignore_index: int):
    """``(flat valid index [n], hidden rows [n, H], labels [n] int64)``; reads the count of valid rows (a sync)."""
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().squeeze(1)
    hidden = logits.hidden.reshape(-1, logits.head.hidden_size)
    return index, hidden.index_select(0, index), flat.index_select(0, index).long()


def _needs(hidden: torch.Tensor, head: LMHead) -> tuple[bool, bool]:
    grad = torch.is_grad_enabled()
    trained = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    return grad and hidden.requires_grad, grad and trained


def _scatter(values: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Values of the valid rows back at their positions, exactly 0 elsewhere, shaped like ``labels``."""
    out = torch.zeros(labels.numel(), dtype=values.dtype, device=values.device)
    return out.index_put((index,), values).view(labels.shape)


def check_vocab_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return min(vocab, DEFAULT_VOCAB_CHUNK)
    return min(check_int(chunk_size, "chunk_size", low=1), vocab)


def fused_token_logps(logits: FusedLogits, labels: torch.Tensor, ignore_index: int,
                      chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, lse)`` shaped like ``labels`` (see :func:`tidpo.token_logps_and_lse`)."""
    head = logits.head
    index, rows, y = _valid_rows(logits, labels, ignore_index)
    need_rows, need_head = _needs(logits.hidden, head)
    logp, lse = FusedTokenLogps.apply(rows, head.weight, head.bias, y, head.scale, head.softcap,
                                      check_vocab_chunk(chunk_size, head.vocab_size), need_rows, need_head,
                                      _compute_dtype(logits.hidden, head.weight))
    return _scatter(logp, index, labels), _scatter(lse.detach(), index, labels)


def fused_token_kl(p_logits: FusedLogits, q_logits: FusedLogits, labels: torch.Tensor, ignore_index: int,
                   chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, lse_p, lse_q)`` shaped like ``labels`` (see :func:`tidpo.token_kl`)."""
    head_p, head_q = p_logits.head, q_logits.head
    index, rows_p, _ = _valid_rows(p_logits, labels, ignore_index)
    rows_q = q_logits.hidden.reshape(-1, head_q.hidden_size).index_select(0, index)
    needs = (_needs(p_logits.hidden, head_p), _needs(q_logits.hidden, head_q))
    dtypes = (_compute_dtype(p_logits.hidden, head_p.weight), _compute_dtype(q_logits.hidden, head_q.weight))
    kl, lse_p, lse_q = FusedTokenKL.apply(rows_p, head_p.weight, head_p.bias, rows_q, head_q.weight, head_q.bias,
                                          ((head_p.scale, head_p.softcap), (head_q.scale, head_q.softcap)),
                                          check_vocab_chunk(chunk_size, head_p.vocab_size), needs, dtypes)
    return (_scatter(kl, index, labels), _scatter(lse_p.detach(), index, labels),
            _scatter(lse_q.detach(), index, labels))
