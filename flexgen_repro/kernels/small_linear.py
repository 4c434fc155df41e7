"""Triton y = x @ W.T + b for a few rows of x (small-batch decode), dense 16-bit W.

At batch 2 a decode linear reads W once and does almost no arithmetic: it should run at HBM
speed. Each program streams BLOCK_N rows of W through the whole in-dimension (several loads in
flight, `num_stages`), the rows of x padded to the 16 that tl.dot needs, and writes its outputs
with the bias added, in one kernel. Imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_M = 16        # rows of x handled (tl.dot's minimum tile); more rows go to cuBLAS
_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4,) for s in (3, 4, 5)
            if bn * bk <= 64 * 256]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _kernel(x, w, b, y, M, N, K, stride_xm, stride_wn, stride_ym,
            HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, 16)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        xt = tl.load(x + rows[:, None] * stride_xm + kk[None, :],
                     mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        wt = tl.load(w + cols[:, None] * stride_wn + kk[None, :],
                     mask=(cols[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc)
    if HAS_BIAS:
        acc += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + rows[:, None] * stride_ym + cols[None, :], acc.to(y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
            and w.dim() == 2 and w.stride(1) == 1 and x.shape[-1] == w.shape[1]
            and 0 < x.numel() // x.shape[-1] <= MAX_M)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T + b (N,), for at most MAX_M rows of x."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    m, n = flat.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _kernel[grid](flat, w, b if b is not None else w, y, m, n, k, flat.stride(0), w.stride(0),
                  y.stride(0), HAS_BIAS=b is not None)
    return y.view(*x.shape[:-1], n)
