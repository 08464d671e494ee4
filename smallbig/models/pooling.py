"""Fast stride-s 'same' pooling for the efficient formulation: window maxima / sums from shifted
views in the forward, a backward that stored nothing but the input.

Why (measured on this project's CPU, 1 thread; ``benchmarks/formulations.py --profile``):
PyTorch's ``max_pool2d`` / ``max_pool3d`` on NCHW / NCTHW tensors are scalar loops — a 3×3
stride-1 max pooling of a [16, 64, 28, 28] tensor took 17 ms with autograd, 26× the 0.66 ms of
two rounds of ``torch.maximum`` over shifted views and 4× the 3×3 convolution after it — and
with autograd they keep int64 indices (twice the bytes of the float32 activation) until backward.

Here the forward keeps only its input (alive anyway: it is the block's activation); the backward
recomputes the window arg-maxima with PyTorch's vectorised channels-last kernels
(``max_pool2d_with_indices`` on channels-last frames for H×W; for time, the frame-major tensor
``[N, T, R]`` seen as a channels-last image ``[N, R, T, 1]``, R = C·H·W) and routes the gradient
with PyTorch's own ``max_pool2d_with_indices_backward``. So the gradient is PyTorch's: each
output's gradient goes to the first maximum of its window in scan order, spatially over the H×W
window, then over time (the separable composition the efficient formulation always used; it
equals a 3-D pooling's routing except on ties between distinct inputs). Padding is -inf for max
(never selected); ``avg`` counts the zero padding (``count_include_pad=True``) and its backward is
the same box sum over the gradient (a symmetric window with zero padding is self-adjoint).

Inputs: frames ``[F, C, H, W]`` (spatial pooling only, e.g. the stem) or the frame-major view
``[N, T, C, H, W]`` of frames ``[N*T, C, H, W]`` (each frame one contiguous block in memory,
NCHW or channels-last inside).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CL = torch.channels_last


def _out_len(size: int, k: int, s: int) -> int:
    return (size - 1) // s + 1 if k > 0 else 1  # 'same' padding k // 2, k odd


def _src(size: int, n_out: int, d: int, s: int) -> tuple[int, int, int]:
    """Output positions i whose input s*i + d lies in [0, size): (first i, count, first input)."""
    lo = 0 if d >= 0 else (-d + s - 1) // s
    hi = min(n_out, (size - 1 - d) // s + 1) if size - 1 - d >= 0 else 0
    return lo, max(0, hi - lo), s * lo + d


def _take(x: torch.Tensor, dim: int, start: int, count: int, step: int) -> torch.Tensor:
    """x[..., start : start + step * count : step, ...] along dim (a view)."""
    idx: list[Any] = [slice(None)] * x.dim()
    idx[dim] = slice(start, start + step * (count - 1) + 1, step)
    return x[tuple(idx)]


def _shift_reduce(x: torch.Tensor, dim: int, k: int, s: int, mode: str) -> torch.Tensor:
    """Pool along one dim: window k (odd), stride s, 'same' padding k // 2; 'avg' sums (the caller
    divides)."""
    if k == 1 and s == 1:
        return x
    r, size = k // 2, x.shape[dim]
    n_out = _out_len(size, k, s)
    out = _take(x, dim, 0, n_out, s).clone()  # offset 0 reaches every output position
    for d in range(-r, r + 1):
        lo, cnt, first = _src(size, n_out, d, s)
        if d == 0 or cnt <= 0:
            continue
        dst, src = out.narrow(dim, lo, cnt), _take(x, dim, first, cnt, s)
        if mode == "max":
            torch.maximum(dst, src, out=dst)
        else:
            dst.add_(src)
    return out


def _sum_adjoint(g: torch.Tensor, shape: torch.Size, dim: int, k: int, s: int) -> torch.Tensor:
    """Adjoint of _shift_reduce(mode='avg') along dim: scatter-add of g over each window."""
    r, size, n_out = k // 2, shape[dim], g.shape[dim]
    gx = g.new_zeros(shape)
    for d in range(-r, r + 1):
        lo, cnt, first = _src(size, n_out, d, s)
        if cnt > 0:
            _take(gx, dim, first, cnt, s).add_(g.narrow(dim, lo, cnt))
    return gx


def _time_view(frames: torch.Tensor, n: int) -> torch.Tensor:
    """Frames [N*T, C, H, W] as a channels-last image [N, R, T, 1], R = (H, W, C) flattened:
    no copy for channels-last frames."""
    t = frames.shape[0] // n
    return frames.permute(0, 2, 3, 1).reshape(n, t, 1, -1).permute(0, 3, 1, 2)


def _frames_cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL)


def _pool_forward(x: torch.Tensor, n: int, kt: int, kh: int, kw: int, s: int, mode: str) -> torch.Tensor:
    five = x.dim() == 5
    f = x.flatten(0, 1) if five else x
    f = _shift_reduce(_shift_reduce(f, 3, kw, s, mode), 2, kh, s, mode)
    if five:
        v = f.reshape(x.shape[0], x.shape[1], *f.shape[1:])
        if kt == 0:  # global over time
            v = v.amax(1, keepdim=True) if mode == "max" else v.sum(1, keepdim=True)
        else:
            v = _shift_reduce(v, 1, kt, 1, mode)
        f = v
    if mode == "avg":
        window = kh * kw * ((x.shape[1] if kt == 0 else kt) if five else 1)
        f = f.div_(window)
    return f


def _max_backward(
    g: torch.Tensor, x: torch.Tensor, n: int, kt: int, kh: int, kw: int, s: int
) -> torch.Tensor:
    five = x.dim() == 5
    xf = _frames_cl(x.flatten(0, 1) if five else x)
    spatial = (kh, kw, s) != (1, 1, 1)
    if spatial:
        a, idx_s = F.max_pool2d(xf, (kh, kw), s, (kh // 2, kw // 2), return_indices=True)
        a = _frames_cl(a)
    else:
        a = xf
    if five:
        t = x.shape[1]
        kernel, pad = (t, 0) if kt == 0 else (kt, kt // 2)
        gf = _frames_cl(g.flatten(0, 1))
        if kernel > 1:
            av = _time_view(a, n)
            _, idx_t = F.max_pool2d(av, (kernel, 1), 1, (pad, 0), return_indices=True)
            ga = torch.ops.aten.max_pool2d_with_indices_backward(
                _time_view(gf, n), av, [kernel, 1], [1, 1], [pad, 0], [1, 1], False, idx_t
            )
            fr, c, h, w = a.shape
            gf = _frames_cl(ga.permute(0, 2, 3, 1).reshape(fr, h, w, c).permute(0, 3, 1, 2))
    else:
        gf = _frames_cl(g)
    if spatial:
        gf = torch.ops.aten.max_pool2d_with_indices_backward(
            gf, xf, [kh, kw], [s, s], [kh // 2, kw // 2], [1, 1], False, idx_s
        )
    return gf.reshape(x.shape) if five else gf


def _avg_backward(
    g: torch.Tensor, shape: torch.Size, n: int, kt: int, kh: int, kw: int, s: int
) -> torch.Tensor:
    five = len(shape) == 5
    window = kh * kw * ((shape[1] if kt == 0 else kt) if five else 1)
    g = g / window
    fshape = torch.Size([shape[0] * shape[1], *shape[2:]]) if five else shape
    if five:
        ho, wo = _out_len(shape[3], kh, s), _out_len(shape[4], kw, s)
        mid = torch.Size([shape[0], shape[1], shape[2], ho, wo])
        g = g.expand(mid) if kt == 0 else _sum_adjoint(g, mid, 1, kt, 1) if kt > 1 else g
        g = g.reshape(fshape[0], shape[2], ho, wo)
    if kh > 1 or s > 1:
        g = _sum_adjoint(g, torch.Size([*g.shape[:2], fshape[2], g.shape[3]]), 2, kh, s)
    if kw > 1 or s > 1:
        g = _sum_adjoint(g, fshape, 3, kw, s)
    return g.reshape(shape)


def _identity(x: torch.Tensor, kt: int, kh: int, kw: int, s: int) -> bool:
    return (kt == 1 or x.dim() == 4) and (kh, kw, s) == (1, 1, 1)


# Custom operators (torch.library): opaque to torch.compile (Dynamo does not trace the Python
# loops over window offsets, Inductor calls them as they are) with their own autograd formula.
def _frame_pool(x: torch.Tensor, n: int, kt: int, kh: int, kw: int, stride: int, mode: str) -> torch.Tensor:
    if _identity(x, kt, kh, kw, stride):
        return x.clone()
    return _pool_forward(x, n, kt, kh, kw, stride, mode)


def _frame_pool_backward(
    g: torch.Tensor, x: torch.Tensor, n: int, kt: int, kh: int, kw: int, stride: int, mode: str
) -> torch.Tensor:
    if _identity(x, kt, kh, kw, stride):
        return g.clone()
    if mode == "max":
        return _max_backward(g, x, n, kt, kh, kw, stride)
    return _avg_backward(g, x.shape, n, kt, kh, kw, stride)


frame_pool = torch.library.custom_op("smallbig::frame_pool", _frame_pool, mutates_args=())
frame_pool_backward = torch.library.custom_op(
    "smallbig::frame_pool_backward", _frame_pool_backward, mutates_args=()
)
# shapes and strides on fake tensors: the same code (every op it uses has a meta kernel)
frame_pool.register_fake(_frame_pool)
frame_pool_backward.register_fake(_frame_pool_backward)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.cfg = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    (x,) = ctx.saved_tensors
    return (frame_pool_backward(g, x, *ctx.cfg),) + (None,) * 6


frame_pool.register_autograd(_backward, setup_context=_setup)


def pool(x: torch.Tensor, n: int, kt: int, kh: int, kw: int, stride: int, mode: str) -> torch.Tensor:
    """Pooling with 'same' padding (kernel // 2) and spatial stride ``stride``.

    x: frames [F, C, H, W] (kt ignored) or the frame-major view [N, T, C, H, W] of frames; kt odd,
    or 0 for global over time (the result keeps a time axis of length 1); kh, kw odd.
    mode: 'max' or 'avg' (zero padding counted in the mean)."""
    if mode not in ("max", "avg"):
        raise ValueError(f"pooling mode must be 'max' or 'avg', got {mode!r}")
    for name, k in (("kt", kt), ("kh", kh), ("kw", kw)):
        if (k % 2 == 0 and not (name == "kt" and k == 0)) or k < 0:
            raise ValueError(f"pooling {name}={k}: must be odd (kt 0 = global over time)")
    return frame_pool(x, n, kt, kh, kw, stride, mode)
