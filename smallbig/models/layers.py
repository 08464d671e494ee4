"""Building blocks of the video ResNets: conv+BN, the SmallBig unit, the extra units, NonLocal.

Every module takes and returns a clip tensor of logical shape ``[N, C, T, H, W]``.

Two formulations of the same maths live side by side (``module.efficient``):

* ``reference``: the straightforward one, written as in the paper: ``conv3d``, ``max_pool3d``
  / ``avg_pool3d`` and BatchNorm on 5-D tensors, one call per view.
* ``efficient`` (default): 1×k×k convs run as ``conv2d`` over the N·T frames; the tensor
  handed from module to module is stored *frame-major* (memory order ``[N, T, C, H, W]``, a
  transposed view of ``[N, C, T, H, W]``) so that going to frames and back costs nothing;
  big-view pooling is separable (2-D spatial pooling on frames, then a kt×1×1 pooling over a free
  view of the frame-major tensor); a
  shared big-view conv runs on small and big view in one call (concatenated along the batch);
  in eval mode BatchNorm is folded into the conv, and a shared SmallBig unit becomes a single
  conv over the channel-concatenated views ``[x, P(x)]`` with weights ``[W·s_s, W·s_b]``.

Both formulations have identical parameters and state-dict keys; tests check them equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallbig.models import pooling

PoolDim = int | str
Pool = tuple[PoolDim, int, int]  # [kt|'T', kh, kw]


def _running_stats(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(running_mean, running_var): our BNs always track them."""
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean, bn.running_var


# --------------------------------------------------------------------------------------------
# layout helpers
def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[N, C, T, H, W] -> [N*T, C, H, W] (free when x is stored frame-major)."""
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


def from_frames(y: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """[N*T, C, H, W] -> [N, C, T, H, W] as a view (frame-major storage)."""
    return y.reshape(n, t, *y.shape[1:]).transpose(1, 2)


class BatchNorm(nn.BatchNorm3d):
    """BatchNorm3d that also accepts frames ``[N*T, C, H, W]`` (same statistics: the mean and
    variance run over every axis but C either way)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4, 5):
            raise ValueError(f"BatchNorm: expected a 4-D or 5-D input, got {input.dim()}-D")


def zero_bn(bn: nn.BatchNorm3d) -> None:
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with the eval-mode BN folded in: BN(W x) = (W s) x + b."""
    mean, var = _running_stats(bn)
    scale = bn.weight * torch.rsqrt(var + bn.eps)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bn.bias - mean * scale
    return w, b


def _fold(module: nn.Module) -> bool:
    """BN folding applies in eval mode, when the BN uses running statistics."""
    return not module.training


# --------------------------------------------------------------------------------------------
# big-view pooling (sizes checked with the params: smallbig.config, odd and within the input)
def pool_reference(x: torch.Tensor, pool: Pool, mode: str) -> torch.Tensor:
    """P(x) on [N,C,T,H,W]: stride 1, 'same' padding; kt='T' -> whole time axis, output T=1.
    Average pooling counts the zero padding (PyTorch's default ``count_include_pad=True``)."""
    kt, kh, kw = pool
    t = x.shape[2]
    kernel: tuple[int, int, int]
    if isinstance(kt, str):  # 'T'
        kernel, padding = (t, kh, kw), (0, kh // 2, kw // 2)
    else:
        kernel, padding = (kt, kh, kw), (kt // 2, kh // 2, kw // 2)
    if mode == "max":
        return F.max_pool3d(x, kernel, stride=1, padding=padding)
    # zero padding counted in the mean (count_include_pad); padding explicitly lets the window
    # be larger than a small feature map
    pt, ph, pw = padding
    return F.avg_pool3d(F.pad(x, (pw, pw, ph, ph, pt, pt)), kernel, stride=1)


def pool_frames(f: torch.Tensor, n: int, t: int, pool: Pool, mode: str) -> tuple[torch.Tensor, int]:
    """Separable P on frames [N*T, C, H, W] -> (pooled frames [N*Tp, C, H, W], Tp): window maxima
    / sums over shifted views of the frame-major [N, T, C, H, W] view, H×W then T ('T' = global
    over time, Tp = 1); only the input is kept for backward (``pooling.py``)."""
    kt, kh, kw = pool
    v = f.reshape(n, t, *f.shape[1:])
    y = pooling.pool(v, n, 0 if isinstance(kt, str) else kt, kh, kw, 1, mode)
    tp = y.shape[1]
    return y.reshape(n * tp, *y.shape[2:]), tp


# --------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """conv (kt×kh×kw, spatial stride s, 'same' padding, no bias) -> BN. No ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: Sequence[int], stride: int = 1, efficient: bool = True
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.conv = nn.Conv3d(
            cin,
            cout,
            (kt, kh, kw),
            stride=(1, stride, stride),
            padding=(kt // 2, kh // 2, kw // 2),
            bias=False,
        )
        self.bn = BatchNorm(cout)
        self.efficient = efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.efficient:
            return self.bn(self.conv(x))
        n, _, t = x.shape[:3]
        conv = self.conv
        if conv.kernel_size[0] == 1:
            f = to_frames(x)
            w2 = conv.weight[:, :, 0]
            if _fold(self):
                w, b = fold_bn(w2, self.bn)
                return from_frames(F.conv2d(f, w, b, conv.stride[1:], conv.padding[1:]), n, t)
            return from_frames(self.bn(F.conv2d(f, w2, None, conv.stride[1:], conv.padding[1:])), n, t)
        # temporal kernel (3x1x1): a real 3-D conv, BN folded in eval mode
        x = x.contiguous()
        if _fold(self):
            w, b = fold_bn(conv.weight, self.bn)
            return F.conv3d(x, w, b, conv.stride, conv.padding)
        return self.bn(conv(x))


class SmallBigUnit(nn.Module):
    """One SmallBig layer: ``y = BN_s(W x) + BN_b(W' P(x))`` (W' = W when shared), summed
    before the ReLU that the block applies; ``bn='single'`` gives ``BN(W (x + P(x)))``.

    P: ``pool`` = [kt|'T', kh, kw], stride 1, 'same' padding ('T': global over time, the
    pooled view has length 1 in time and is broadcast-added over T). The conv's spatial stride
    applies to both views (pooling sits before the conv). BN_b starts at gamma = beta = 0.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: int,
        pool: Pool,
        pool_mode: str = "max",
        share: bool = True,
        bn: str = "individual",
        efficient: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = kernel
        if kt != 1:
            raise ValueError("SmallBig unit: the conv must be 1×k×k (time comes from the pooling)")
        self.pool: Pool = (pool[0], pool[1], pool[2])  # validated with the params (smallbig.config)
        self.pool_mode = pool_mode
        self.share = share
        self.single_bn = bn == "single"
        self.efficient = efficient

        def conv() -> nn.Conv3d:
            return nn.Conv3d(
                cin,
                cout,
                kernel_size=(1, kh, kw),
                stride=(1, stride, stride),
                padding=(0, kh // 2, kw // 2),
                bias=False,
            )

        self.conv = conv()
        self.bn = BatchNorm(cout)
        if not share and not self.single_bn:
            self.conv_big = conv()
        if not self.single_bn:
            self.bn_big = BatchNorm(cout)
            zero_bn(self.bn_big)
        self.record = False  # feature_maps(): keep the two BN outputs of the last forward
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        kt, kh, kw = self.pool
        return (
            f"pool={self.pool_mode} {kt}x{kh}x{kw}, share={self.share}, "
            f"bn={'single' if self.single_bn else 'individual'}, efficient={self.efficient}"
        )

    @property
    def big_weight(self) -> torch.Tensor:
        return self.conv.weight if self.share else self.conv_big.weight

    # ---- reference ---------------------------------------------------------------------
    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        p = pool_reference(x, self.pool, self.pool_mode)
        if self.single_bn:
            return self.bn(self.conv(x + p))
        small = self.bn(self.conv(x))
        big = self.bn_big((self.conv if self.share else self.conv_big)(p))
        if self.record:
            self.recorded = (small.detach(), big.expand_as(small).detach())
        return small + big

    # ---- efficient ---------------------------------------------------------------------
    def _forward_efficient(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t = x.shape[:3]
        conv = self.conv
        stride, padding = conv.stride[1:], conv.padding[1:]
        f = to_frames(x)
        pf, tp = pool_frames(f, n, t, self.pool, self.pool_mode)
        w = conv.weight[:, :, 0]
        if self.single_bn:
            if tp == t:
                z = f + pf
            else:
                z = (f.reshape(n, t, *f.shape[1:]) + pf.reshape(n, 1, *pf.shape[1:])).reshape(f.shape)
            if _fold(self):
                wf, bf = fold_bn(w, self.bn)
                return from_frames(F.conv2d(z, wf, bf, stride, padding), n, t)
            return from_frames(self.bn(F.conv2d(z, w, None, stride, padding)), n, t)
        wb = self.big_weight[:, :, 0]
        if _fold(self) and not self.record:
            ws, bs = fold_bn(w, self.bn)
            wbf, bbf = fold_bn(wb, self.bn_big)
            if tp == t:  # one conv over the channel-concatenated views
                y = F.conv2d(
                    torch.cat([f, pf], dim=1), torch.cat([ws, wbf], dim=1), bs + bbf, stride, padding
                )
                return from_frames(y, n, t)
            ys = F.conv2d(f, ws, bs, stride, padding)
            yb = F.conv2d(pf, wbf, bbf, stride, padding)
        else:
            # two conv calls, not one over the batch-concatenated views: the concatenation would
            # be a third copy of the activations kept for backward (f and pf are kept anyway)
            ys = F.conv2d(f, w, None, stride, padding)
            yb = F.conv2d(pf, wb, None, stride, padding)
            ys, yb = self.bn(ys), self.bn_big(yb)
        out = ys.reshape(n, t, *ys.shape[1:]) + yb.reshape(n, tp, *yb.shape[1:])
        if self.record:
            s5 = from_frames(ys, n, t)
            b5 = from_frames(yb, n, tp)
            self.recorded = (s5.detach(), b5.expand_as(s5).detach())
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_efficient(x) if self.efficient else self._forward_reference(x)


class ExtraUnit(nn.Module):
    """The SmallBig extra unit (Fig. 2f), applied to a block's input before the block:
    ``x <- x + BN_e(W2((W1 x) ⊙ σ(W1 GMP(x))))``; W1: C -> C/4, W2: C/4 -> C (1×1×1, no
    bias), W1 shared by the full-resolution view and the global-max-pooled (T×H×W) view.
    BN_e starts at gamma = beta = 0 (the unit is the identity at initialisation).
    ``share=False`` (the params' ``unit.share: false``, Table 6 "without share") gives the
    pooled view its own W1 (``w1_big``), like the SmallBig units' separate big-view convs."""

    def __init__(self, channels: int, efficient: bool = True, share: bool = True) -> None:
        super().__init__()
        hidden = max(1, channels // 4)
        self.share = share
        self.w1 = nn.Conv3d(channels, hidden, 1, bias=False)
        if not share:
            self.w1_big = nn.Conv3d(channels, hidden, 1, bias=False)
        self.w2 = nn.Conv3d(hidden, channels, 1, bias=False)
        self.bn = BatchNorm(channels)
        zero_bn(self.bn)
        self.efficient = efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1_big = self.w1 if self.share else self.w1_big
        if not self.efficient:
            gate = torch.sigmoid(w1_big(x.amax(dim=(2, 3, 4), keepdim=True)))
            return x + self.bn(self.w2(self.w1(x) * gate))
        n, c, t = x.shape[:3]
        f = to_frames(x)
        w1 = self.w1.weight.flatten(1)  # [C/4, C]
        w2 = self.w2.weight[:, :, 0]  # [C, C/4, 1, 1]
        gate = torch.sigmoid(F.linear(x.amax(dim=(2, 3, 4)), w1_big.weight.flatten(1)))  # [N, C/4]
        a = F.conv2d(f, w1[:, :, None, None])
        a = (a.reshape(n, t, *a.shape[1:]) * gate[:, None, :, None, None]).reshape(a.shape)
        if _fold(self):
            wf, bf = fold_bn(w2, self.bn)
            y = F.conv2d(a, wf, bf)
        else:
            y = self.bn(F.conv2d(a, w2))
        return x + from_frames(y, n, t)


class SimpleExtraUnit(nn.Module):
    """Table 9 "simple" extra unit, SE-style, in the place of the default one (before the
    block, C = block input width): ``x <- x + BN_e(x ⊙ σ(W2 ReLU(W1 GAP(x))))``, GAP over
    T×H×W, W1: C -> C/4, W2: C/4 -> C (1×1×1, no bias), BN_e zero-initialised so that the unit
    is the identity at initialisation, like the default unit."""

    def __init__(self, channels: int, efficient: bool = True) -> None:
        super().__init__()
        hidden = max(1, channels // 4)
        self.w1 = nn.Conv3d(channels, hidden, 1, bias=False)
        self.w2 = nn.Conv3d(hidden, channels, 1, bias=False)
        self.bn = BatchNorm(channels)
        zero_bn(self.bn)
        self.efficient = efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.efficient:
            s = torch.sigmoid(self.w2(F.relu(self.w1(x.mean(dim=(2, 3, 4), keepdim=True)))))
            return x + self.bn(x * s)
        s = F.linear(x.mean(dim=(2, 3, 4)), self.w1.weight.flatten(1))
        s = torch.sigmoid(F.linear(F.relu(s), self.w2.weight.flatten(1)))  # [N, C]
        n, c, t = x.shape[:3]
        f = to_frames(x)
        z = (f.reshape(n, t, *f.shape[1:]) * s[:, None, :, None, None]).reshape(f.shape)
        if _fold(self):
            mean, var = _running_stats(self.bn)
            scale = self.bn.weight * torch.rsqrt(var + self.bn.eps)
            shift = self.bn.bias - mean * scale
            y = z * scale[:, None, None] + shift[:, None, None]
        else:
            y = self.bn(z)
        return x + from_frames(y, n, t)


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): ``x + BN(W_z(softmax(θᵀφ/√C') g))``
    with C' = C/2, θ/φ/g 1×1×1 convs with bias, the input of φ and g max-pooled 1×2×2 (as in
    Wang et al.'s code), output conv without
    bias followed by a zero-initialised BN (identity at initialisation). One formulation (it is
    already matrix products)."""

    def __init__(self, channels: int, efficient: bool = True) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.inner = inner
        self.theta = nn.Conv3d(channels, inner, 1)
        self.phi = nn.Conv3d(channels, inner, 1)
        self.g = nn.Conv3d(channels, inner, 1)
        self.out = nn.Conv3d(inner, channels, 1, bias=False)
        self.bn = BatchNorm(channels)
        zero_bn(self.bn)
        self.efficient = efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        n, c, t, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [N, C', THW]
        # as Wang et al.'s code: the input of phi and g is max-pooled 1x2x2 (then the convs)
        xp = F.max_pool3d(x, (1, 2, 2), stride=(1, 2, 2)) if (h >= 2 and w >= 2) else x
        phi, g = self.phi(xp).flatten(2), self.g(xp).flatten(2)  # [N, C', M]
        att = torch.softmax(torch.matmul(theta.transpose(1, 2), phi) / math.sqrt(self.inner), dim=-1)
        y = torch.matmul(att, g.transpose(1, 2))  # [N, THW, C']
        y = y.transpose(1, 2).reshape(n, self.inner, t, h, w)
        return x + self.bn(self.out(y))
