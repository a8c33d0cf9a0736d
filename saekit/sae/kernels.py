"""Kernels shared by the SAE architectures, mostly the TopK-style SAEs' sparse ones.

A batch's active latents are kept as row-sorted coordinates ``rows, cols`` with
values ``vals`` (``nnz`` entries, row ``b``'s latents contiguous). The encoder
matmul runs dense once, without autograd; ``gather_preacts`` then makes the
selected pre-activations differentiable with a backward pass that touches only
the ``nnz`` selected entries, and ``sparse_decode`` decodes through
``embedding_bag``. Nothing here forms a dense ``[batch, d_sae]`` gradient.

Batch statistics take a ``batch_sum`` so that, under data parallelism, they cover the
global batch and summing gradients over ranks gives the global gradient.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Sums a tensor over the data-parallel ranks (gradient to the local part); identity on one.
BatchSum = Callable[[Tensor], Tensor]


@torch.no_grad()
def encoder_preacts(x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor,
                    out: Tensor | None = None) -> Tensor:
    """Dense pre-activations ``(x - b_dec) @ W_enc + b_enc``, without autograd: [batch, d_sae].

    ``out``: a tensor of that shape to write them into (a buffer kept across steps, see
    ``workspace``: a fresh one costs a page fault per 4 KiB, since malloc maps allocations
    this large anew each time).
    """
    return torch.addmm(b_enc, x if b_dec is None else x - b_dec, W_enc, out=out)


_buffers = threading.local()  # this thread's kept buffers while ``reused_buffers`` is open


@contextlib.contextmanager
def reused_buffers() -> Iterator[None]:
    """Within: ``workspace`` keeps its buffers and reuses them across steps and SAEs (a
    training run); on exit they are released. Outside, ``workspace`` allocates afresh."""
    outer = getattr(_buffers, "kept", None)
    _buffers.kept = {} if outer is None else outer
    try:
        yield
    finally:
        _buffers.kept = outer


def workspace(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A tensor of ``shape`` with ``like``'s dtype and device, its content left as is: inside
    ``reused_buffers`` the one kept under ``name`` when those match (one per name and device,
    so the SAEs of a sweep share it), else a new one."""
    kept = getattr(_buffers, "kept", None)
    if kept is None:
        return like.new_empty(shape)
    buffer = kept.get((name, like.device))
    if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
        buffer = kept[(name, like.device)] = like.new_empty(shape)
    return buffer


class _SparseGather(torch.autograd.Function):
    """``pre[rows, cols]`` whose gradient flows to ``x, b_dec, W_enc, b_enc`` sparsely."""

    @staticmethod
    def forward(ctx, pre, x, b_dec, W_enc, b_enc, rows, cols):
        ctx.save_for_backward(x, b_dec, W_enc, rows, cols)
        return pre.reshape(-1).index_select(0, rows * pre.shape[1] + cols)  # pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):
        x, b_dec, W_enc, rows, cols = ctx.saved_tensors
        _, needs_x, needs_b_dec, needs_W_enc, needs_b_enc, _, _ = ctx.needs_input_grad
        d_sae = W_enc.shape[1]
        grad_b_enc = W_enc.new_zeros(d_sae).index_add_(0, cols, grad.to(W_enc.dtype))
        grad_x = grad_b_dec = grad_W_enc = None
        if needs_W_enc:
            x_c = x if b_dec is None else x - b_dec
            grad_W_enc = _transpose_spmm(rows, cols, grad, x_c, d_sae).t()
        if needs_b_dec:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if needs_x:
            grad_x = _transpose_spmm(cols, rows, grad, W_enc.t(), x.shape[0]).to(x.dtype)
        return None, grad_x, grad_b_dec, grad_W_enc, grad_b_enc if needs_b_enc else None, None, None


def sorted_offsets(index: Tensor, n: int) -> Tensor:
    """CSR offsets [n + 1] of a sorted index vector [nnz] of values in ``[0, n)``: where each
    value's run starts, then ``nnz``. A binary search, so no host sync on CUDA (``bincount``
    reads the maximum back to size its output)."""
    return torch.searchsorted(index, torch.arange(n + 1, device=index.device, dtype=index.dtype))


def _transpose_spmm(rows: Tensor, cols: Tensor, vals: Tensor, dense: Tensor, n_cols: int) -> Tensor:
    """``G^T @ dense`` [n_cols, d] for the sparse ``G[rows, cols] = vals`` [len(dense), n_cols]."""
    # sparse matmuls are not implemented for every 16-bit dtype: compute those in float32
    compute = dense.dtype if dense.dtype in (torch.float32, torch.float64) else torch.float32
    order = torch.argsort(cols)
    crow = sorted_offsets(cols[order], n_cols)
    if dense.device.type == "cpu":  # a bag per column: embedding_bag beats MKL's CSR matmul
        return F.embedding_bag(rows[order], dense.to(compute).contiguous(), crow, mode="sum",
                               per_sample_weights=vals[order].to(compute),
                               include_last_offset=True).to(dense.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        G_t = torch.sparse_csr_tensor(crow, rows[order], vals[order].to(compute),
                                      (n_cols, dense.shape[0]), check_invariants=False)
    return (G_t @ dense.to(compute)).to(dense.dtype)


def gather_preacts(pre: Tensor, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor,
                   rows: Tensor, cols: Tensor) -> Tensor:
    """The pre-activations ``pre[rows, cols]`` [nnz], differentiable as if made from the weights.

    ``pre`` must equal ``encoder_preacts(x, b_dec, W_enc, b_enc)``. The backward pass costs
    O(nnz * d_in): grad ``W_enc = (x - b_dec)^T G`` as one sparse-dense matmul, grad ``b_enc``
    by ``index_add``, grad ``b_dec = -W_enc @ grad b_enc``. ``rows, cols`` may be in any order.
    """
    return _SparseGather.apply(pre, x, b_dec, W_enc, b_enc, rows, cols)


def row_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Coordinates ``(rows, cols)`` [batch * k] of each row's k largest entries, row-sorted."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.flatten()


def masked_row_topk(pre: Tensor, allowed: Tensor, k: int,
                    positive_only: bool = False) -> tuple[Tensor, Tensor]:
    """Like ``row_topk`` but only among the latents in ``allowed`` ([d_sae] bool); ``k`` capped.

    ``positive_only`` drops the chosen entries that are <= 0: after a ReLU they are zero and
    get no gradient, so leaving them out changes no value and saves their decode and backward.
    Rows stay sorted; a row may then hold fewer than ``k`` entries.
    """
    candidates = allowed.nonzero().squeeze(1)
    k = min(k, candidates.numel())
    if k == 0:
        empty = torch.empty(0, dtype=torch.long, device=pre.device)
        return empty, empty
    values, local = pre.index_select(1, candidates).topk(k, dim=-1, sorted=False)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    cols = candidates[local.flatten()]
    if positive_only:
        keep = values.flatten() > 0
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def positive_masked_topk(pre: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``masked_row_topk(pre, allowed, k, positive_only=True)``'s entries for the ``allowed``
    columns whose sorted indices are ``candidates`` [n_allowed], each row's in column order: the
    positive entries among each row's ``k`` largest in those columns.

    A row with at most ``k`` positive allowed entries keeps them all, so only rows with more need
    a top-k. Cost: a few elementwise passes over the allowed block ``pre[:, candidates]``
    [batch, n_allowed], a top-k over the crowded rows only, and at most ``batch * k`` entries out.
    """
    block = pre.index_select(1, candidates)
    keep = block > 0
    if k < candidates.numel():
        crowded = (keep.count_nonzero(1) > k).nonzero().squeeze(1)
        if crowded.numel():  # their k largest are all positive: keep exactly those
            top = block.index_select(0, crowded).topk(k, dim=-1, sorted=False).indices
            keep[crowded] = torch.zeros_like(keep[crowded]).scatter_(1, top, True)
    rows, local = keep.nonzero().unbind(1)
    return rows, candidates[local]


def batch_topk(pre: Tensor, k: int, batch_sum: BatchSum | None = None) -> tuple[Tensor, Tensor]:
    """Coordinates of the ``k * batch`` largest positive entries of the batch, row-sorted.

    Under data parallelism (``batch_sum`` over several ranks) the batch is the global one: each
    rank keeps its entries among the global top ``k * global batch``, and every entry tied at
    the cut (one process keeps exactly ``k * batch``; ties are common in 16-bit dtypes).
    """
    batch_sum = batch_sum or (lambda value: value)
    n = k * int(batch_sum(pre.new_tensor(pre.shape[0], dtype=torch.float64)))
    values, flat = pre.flatten().topk(min(n, pre.numel()), sorted=False)
    positive = values > 0
    values, flat = values[positive], flat[positive]
    if world_size(batch_sum, pre) > 1 and int(batch_sum(_count(values))) > n:
        flat = flat[values.double() >= global_nth_largest(values, n, batch_sum)]
    flat = flat.sort().values
    return flat // pre.shape[1], flat % pre.shape[1]


def world_size(batch_sum: BatchSum, like: Tensor) -> int:
    """How many ranks ``batch_sum`` sums over (asked with a scalar on ``like``'s device)."""
    return int(batch_sum(like.new_ones((), dtype=torch.float64)))


def _count(values: Tensor) -> Tensor:
    return values.new_tensor(values.numel(), dtype=torch.float64)


def global_nth_largest(values: Tensor, n: int, batch_sum: BatchSum) -> Tensor:
    """The ``n``-th largest of all ranks' positive ``values`` (1 <= n <= their global count),
    as a float64 scalar. On one rank a top-k; on several, a bisection over integer keys (the
    bit patterns of positive floats order like the numbers: float32 keys for 16- and 32-bit
    values, which convert exactly, else float64) with one scalar all-reduce a step, at most 31
    (63 for float64); every rank takes the same steps, as each step's count is global."""
    world = world_size(batch_sum, values)
    if n == values.numel() and world == 1:
        return values.detach().double().min()
    if world == 1:
        return values.detach().double().topk(n, sorted=False).values.min()
    wide = values.dtype == torch.float64
    float_type, int_type = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
    keys = values.detach().to(float_type).view(int_type)
    infinity = 0x7FF0000000000000 if wide else 0x7F800000
    low, high = 1, infinity  # count(keys >= low) >= n > count(keys >= +inf) = 0
    while high - low > 1:
        middle = (low + high) // 2
        if int(batch_sum((keys >= middle).sum().double())) >= n:
            low = middle
        else:
            high = middle
    cut = torch.tensor(low, dtype=int_type).view(float_type)
    return cut.double().to(values.device)


class _SparseDecodeCPU(torch.autograd.Function):
    """``embedding_bag`` decode with a faster CPU backward than its own: grad ``W_dec`` as one
    CSR sparse-dense matmul, grad ``vals`` as a sampled dense-dense matmul (SDDMM) at the
    active coordinates, ``(grad @ W_dec^T)[rows, cols]`` without forming the dense product."""

    @staticmethod
    def forward(ctx, W_dec, vals, rows, cols, offsets):
        ctx.save_for_backward(W_dec, vals, rows, cols, offsets)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals,
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad):
        W_dec, vals, rows, cols, offsets = ctx.saved_tensors
        needs_W_dec, needs_vals = ctx.needs_input_grad[:2]
        grad_W_dec = grad_vals = None
        if needs_W_dec:
            grad_W_dec = _transpose_spmm(rows, cols, vals, grad, W_dec.shape[0])
        if needs_vals:
            compute = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                pattern = torch.sparse_csr_tensor(
                    offsets, cols, vals.new_zeros(cols.shape, dtype=compute),
                    (grad.shape[0], W_dec.shape[0]), check_invariants=False)
                grad_vals = torch.sparse.sampled_addmm(
                    pattern, grad.to(compute), W_dec.t().to(compute), beta=0.0).values()
            grad_vals = grad_vals.to(vals.dtype)
        return grad_W_dec, grad_vals, None, None, None


def sparse_decode(W_dec: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int) -> Tensor:
    """``sum_j vals_j * W_dec[cols_j]`` per row, without the bias: [n_rows, d_in]. Rows sorted."""
    offsets = sorted_offsets(rows, n_rows)
    vals = vals.to(W_dec.dtype)
    if W_dec.device.type == "cpu":
        return _SparseDecodeCPU.apply(W_dec, vals, rows, cols, offsets)
    # elsewhere (CUDA) embedding_bag's own backward is fast, and SDDMM may want sorted columns
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals,
                           include_last_offset=True)


def fired_latents(cols: Tensor, vals: Tensor, d_sae: int) -> Tensor:
    """[d_sae] bool: which latents have a positive value among ``vals``."""
    hits = torch.zeros(d_sae, dtype=vals.dtype, device=vals.device)
    return hits.index_add_(0, cols, (vals > 0).to(vals.dtype)) > 0


def jump_relu(pre: Tensor, threshold: Tensor) -> Tensor:
    """``pre`` where it exceeds ``threshold`` (taken as >= 0), else 0: SAELens's JumpReLU rule."""
    return torch.where(pre > threshold.clamp_min(0), pre, 0)


@torch.no_grad()
def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's estimate of the point [d] minimising the summed distance to ``points`` [n, d]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        update = weights @ points / weights.sum()
        if (update - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return update
        median = update
    return median


def warmup(coefficient: float, warmup_fraction: float, progress: float) -> float:
    """``coefficient`` ramped linearly from 0 over the first ``warmup_fraction`` of training."""
    if warmup_fraction <= 0:
        return coefficient
    return coefficient * min(1.0, max(0.0, progress) / warmup_fraction)


def total_variance(x: Tensor, batch_sum: BatchSum) -> Tensor:
    """``sum_b ||x_b - mean(x)||^2`` over the whole (multi-rank) batch ``x`` [batch, d], no grad."""
    x64 = x.detach().double()
    n = batch_sum(x64.new_tensor(float(x.shape[0])))
    squares, total = batch_sum(x64.pow(2).sum()), batch_sum(x64.sum(0))
    return (squares - total.pow(2).sum() / n).clamp_min(1e-12).to(x.dtype)


def batch_mean(per_sample: Tensor, batch_sum: BatchSum) -> Tensor:
    """Mean of ``per_sample`` [batch] over the whole (multi-rank) batch."""
    count = per_sample.new_tensor(float(per_sample.numel()), dtype=torch.float64)
    return batch_sum(per_sample.sum()) / batch_sum(count).to(per_sample.dtype)


def reconstruction_losses(x: Tensor, x_hat: Tensor, batch_sum: BatchSum) -> dict[str, Tensor]:
    """``mse`` = E_b ||x - x_hat||^2 and ``fvu`` = sum ||x - x_hat||^2 / ``total_variance(x)``."""
    squared_error = (x - x_hat).pow(2).sum(-1)
    fvu = batch_sum(squared_error.sum()) / total_variance(x, batch_sum)
    return {"mse": batch_mean(squared_error, batch_sum), "fvu": fvu}
