"""dpdm's per-example gradient engine: gradients of the K-averaged loss, one per example, fast.

DP-SGD needs, for every example i, the gradient of its loss ℓ_i = (1/K) Σ_k ℓ_ik (DPDM Eq. 7). The
network sees B·K rows (example-major, row i·K + k). Stock Opacus hooks compute a gradient per *row* and
we would then sum each example's K rows; this engine never forms per-row gradients and never lets
autograd compute the (unused) batch weight gradient:

1. Forward hooks record, for each layer with parameters, its input activation and its output.
2. One `torch.autograd.grad` call asks for the gradients with respect to those *outputs* only. Autograd
   then skips every weight-gradient kernel (the weights are not among the requested inputs), so the
   backward costs about what the input-gradient half of an ordinary backward costs.
3. Each layer's per-example weight gradient is one batched contraction over the K rows *and* the spatial
   positions of an example at once: e.g. for a Linear layer, per example, G_iᵀ A_i with the K·HW rows of
   example i stacked — a (B, out, in) result, never (B·K, out, in).

Together with clipping and noise in Opacus' DPOptimizer this is the same mechanism as before; only the
arithmetic that produces `p.grad_sample` changes, and tests compare it with brute-force autograd.

Supported layers: Conv2d (any stride/padding/dilation, groups=1), Linear, GroupNorm, Embedding; a layer
called several times in one forward gets the sum of its per-call contributions.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
CONV_METHODS = ("grouped", "unfold")


def unsupported_layer(sub: nn.Module) -> str | None:
    """Why no per-example gradient rule covers this module's own trainable parameters, or None.

    The one rule for every engine (dp_engine=opacus too): what fold cannot differentiate per example
    exactly, no engine trains.
    """
    if not [p for p in sub.parameters(recurse=False) if p.requires_grad]:
        return None
    if not isinstance(sub, SUPPORTED) or (isinstance(sub, nn.Conv2d) and (
            sub.groups != 1 or isinstance(sub.padding, str) or sub.padding_mode != "zeros")) or (
            isinstance(sub, nn.Embedding) and (sub.padding_idx is not None or sub.max_norm is not None)):
        return ("has parameters but no per-example gradient rule; use Conv2d (groups=1, numeric zero "
                "padding), Linear, GroupNorm or Embedding (no padding_idx or max_norm).")
    return None


@dataclass
class _Record:
    module: nn.Module
    activation: Tensor
    output: Tensor


class ShapeOnlyWeight:
    """A dense stand-in for the grouped convolution's (B·Cout, Cin, kh, kw) weight, reused across layers.

    The backward kernel computes the weight gradient from the input and the output gradient alone; it
    reads the weight for its shape but needs it dense. Building it from the layer's weight (expand, then
    reshape) copied B weights every call, as many bytes as the gradient itself: 7 copies of 36-75 MB per
    chunk of 256 in ddpmpp_tiny_p2, page-faulted in afresh each time because they exceed malloc's mmap
    threshold (docs/performance.md). One zero buffer, grown to the largest layer, serves every call.
    """

    def __init__(self):
        self._buf: Tensor | None = None

    def like(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            self._buf = buf = torch.zeros(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


@dataclass
class PerExampleGradients:
    """Attach to `module`; inside `capture()` run the forward, then call `backward(per_example_losses)`.

    After `backward`, every trainable parameter p has `p.grad_sample` of shape (B, *p.shape): the gradient
    of ℓ_i for each of the B examples; `p.grad` is left untouched (autograd never computes it).
    """

    module: nn.Module
    noise_multiplicity: int = 1
    conv_method: str = "grouped"
    _records: list = field(default_factory=list, repr=False)
    _capturing: bool = field(default=False, repr=False)
    _handles: list = field(default_factory=list, repr=False)
    _weight_stand_in: ShapeOnlyWeight = field(default_factory=ShapeOnlyWeight, repr=False)

    def __post_init__(self):
        if self.noise_multiplicity < 1:
            raise ValueError(f"loss.noise_multiplicity must be >= 1, got {self.noise_multiplicity}")
        if self.conv_method not in CONV_METHODS:
            raise ValueError(f"conv_method must be one of {CONV_METHODS}, got {self.conv_method!r}")
        for name, sub in self.module.named_modules():
            if not [p for p in sub.parameters(recurse=False) if p.requires_grad]:
                continue
            why = unsupported_layer(sub)
            if why:
                raise ValueError(f"Layer {name or type(sub).__name__} ({type(sub).__name__}): {why}")
            self._handles.append(sub.register_forward_hook(self._record))

    # ---- capture --------------------------------------------------------------------------------
    def _record(self, module, inputs, output):
        if self._capturing and torch.is_grad_enabled():
            self._records.append(_Record(module, inputs[0].detach(), output))

    @contextmanager
    def capture(self):
        self._records.clear()
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def cleanup(self) -> None:
        """Detach from the module (same name as Opacus' hooks)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()

    # ---- backward -------------------------------------------------------------------------------
    def backward(self, per_example_losses: Tensor) -> None:
        """Set p.grad_sample[i] = ∇ℓ_i for the losses of the forward run inside `capture()`."""
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("No layer was recorded: run the forward inside `with engine.capture():`")
        B = per_example_losses.shape[0]
        # The sum's gradient w.r.t. a row's output is exactly that row's own contribution (rows do not
        # interact: no BatchNorm), so no rescaling by the batch size is needed.
        grads = torch.autograd.grad(per_example_losses.sum(), [r.output for r in records],
                                    allow_unused=True)
        for p in self.module.parameters():
            if p.requires_grad:
                p.grad_sample = None
        for rec, g in zip(records, grads, strict=True):
            if rec.activation.shape[0] != B * self.noise_multiplicity:
                raise RuntimeError(
                    f"{type(rec.module).__name__} saw {rec.activation.shape[0]} rows, not B·K = "
                    f"{B * self.noise_multiplicity} (B={B} examples, K={self.noise_multiplicity}): the "
                    "network must see B·K rows, a multiple of K, example-major")
            if g is None:  # the output did not reach the loss: zero gradient (filled in below)
                continue
            for p, gs in _layer_grad_samples(rec.module, rec.activation, g, B, self.conv_method,
                                             self._weight_stand_in):
                gs = gs.to(p.dtype)
                p.grad_sample = gs if p.grad_sample is None else p.grad_sample + gs
        for p in self.module.parameters():
            if p.requires_grad and p.grad_sample is None:  # layer not called, or not reaching the loss
                p.grad_sample = torch.zeros((B, *p.shape), dtype=p.dtype, device=p.device)


def _layer_grad_samples(m: nn.Module, a: Tensor, g: Tensor, B: int, conv_method: str,
                        weight_stand_in: ShapeOnlyWeight):
    """(param, (B, *param.shape)) pairs for one recorded call of layer m with input a, output grad g."""
    if a.is_floating_point() and a.dtype != g.dtype:
        # Mixed precision (autocast): the layer computed in its output's dtype, so contract in it too;
        # the result is cast to the parameter's dtype (fp32) before clipping.
        a = a.to(g.dtype)
    if isinstance(m, nn.Linear):
        yield from _linear(m, a, g, B)
    elif isinstance(m, nn.Conv2d):
        yield from _conv(m, a, g, B, conv_method, weight_stand_in)
    elif isinstance(m, nn.GroupNorm):
        yield from _group_norm(m, a, g, B)
    else:
        yield from _embedding(m, a, g, B)


def _linear(m: nn.Linear, a: Tensor, g: Tensor, B: int):
    # Rows of an example: its K copies times any leading dims, contracted in one bmm.
    a = a.reshape(B, -1, a.shape[-1])
    g = g.reshape(B, -1, g.shape[-1])
    if m.weight.requires_grad:
        yield m.weight, torch.bmm(g.transpose(1, 2), a)
    if m.bias is not None and m.bias.requires_grad:
        yield m.bias, g.sum(1)


def _per_example_columns(t: Tensor, B: int) -> Tensor:
    """(B·K, C, L) → (B, C, K·L): the K copies' positions side by side, so one bmm sums over both."""
    BK, C, L = t.shape
    K = BK // B
    return t.reshape(B, K, C, L).transpose(1, 2).reshape(B, C, K * L)


def _conv(m: nn.Conv2d, a: Tensor, g: Tensor, B: int, method: str, weight_stand_in: ShapeOnlyWeight):
    if m.weight.requires_grad:
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
            # A 1x1 convolution is a Linear over positions: one bmm, no im2col (fastest measured).
            gw = _bmm_weight_grad(g.flatten(2), a.flatten(2), B)
        elif method == "grouped":
            gw = _conv_weight_grad_grouped(m, a, g, B, weight_stand_in)
        else:
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            gw = _bmm_weight_grad(g.flatten(2), cols, B)
        yield m.weight, gw.view(B, *m.weight.shape)
    if m.bias is not None and m.bias.requires_grad:
        yield m.bias, _fold(g.sum((2, 3)), B)


def _bmm_weight_grad(g: Tensor, cols: Tensor, B: int) -> Tensor:
    """Σ over an example's K copies and L positions of g ⊗ cols: (B·K, Cout, L), (B·K, D, L) → (B, Cout, D)."""
    return torch.bmm(_per_example_columns(g, B), _per_example_columns(cols, B).transpose(1, 2))


def _conv_weight_grad_grouped(m: nn.Conv2d, a: Tensor, g: Tensor, B: int,
                              weight_stand_in: ShapeOnlyWeight) -> Tensor:
    """Per-example weight gradients as the weight gradient of a B-group convolution.

    Put the examples in the channel dimension and the K copies in the batch dimension: a convolution
    with groups=B then has weight (B·Cout, Cin, kh, kw), and its weight gradient — summed over its batch
    (the K copies) and positions by the convolution backward kernel itself — is the stack of the B
    per-example gradients. No im2col buffer (9x the activation for 3x3) is ever built.
    """
    BK, Cin, H, W = a.shape
    K = BK // B
    Cout, Ho, Wo = g.shape[1:]
    a_g = a.reshape(B, K, Cin, H, W).transpose(0, 1).reshape(K, B * Cin, H, W)
    g_g = g.reshape(B, K, Cout, Ho, Wo).transpose(0, 1).reshape(K, B * Cout, Ho, Wo)
    w_g = weight_stand_in.like((B * Cout, *m.weight.shape[1:]), a.dtype, a.device)  # its shape only
    _, gw, _ = torch.ops.aten.convolution_backward(
        g_g, a_g, w_g, None, list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], B,
        [False, True, False])
    return gw


def _group_norm(m: nn.GroupNorm, a: Tensor, g: Tensor, B: int):
    N, C = a.shape[:2]
    x, gg = a.reshape(N, C, -1), g.reshape(N, C, -1)
    g_sum = gg.sum(-1)  # (N, C): the bias gradient per row
    if m.weight is not None and m.weight.requires_grad:
        # Σ_pos g·x̂ with x̂ = (x − μ_group)·rstd_group, without materializing x̂:
        #   = rstd · (Σ_pos g·x − μ · Σ_pos g)
        # μ and rstd per row and group come from the fused GroupNorm kernel (torch.var_mean is ~15x
        # slower on CPU); its normalized output is discarded.
        _, mean, rstd = torch.ops.aten.native_group_norm(a, None, None, N, C, x.shape[-1],
                                                         m.num_groups, m.eps)
        per_group = C // m.num_groups
        mean = mean.reshape(N, m.num_groups).repeat_interleave(per_group, dim=1)
        rstd = rstd.reshape(N, m.num_groups).repeat_interleave(per_group, dim=1)
        gx = (gg * x).sum(-1)
        yield m.weight, _fold(rstd * (gx - mean * g_sum), B)
    if m.bias is not None and m.bias.requires_grad:
        yield m.bias, _fold(g_sum, B)


def _fold(per_row: Tensor, B: int) -> Tensor:
    """(B·K, ...) → (B, ...): sum each example's K rows (reduce the contiguous row-wise sums last)."""
    return per_row.reshape(B, -1, *per_row.shape[1:]).sum(1)


def _embedding(m: nn.Embedding, idx: Tensor, g: Tensor, B: int):
    if not m.weight.requires_grad:
        return
    n, dim = m.num_embeddings, m.embedding_dim
    rows = idx.reshape(B, -1)
    # Flat index example·n + token: one scatter-add accumulates every row into its example's slice.
    flat = (rows + n * torch.arange(B, device=idx.device)[:, None]).reshape(-1)
    out = torch.zeros((B * n, dim), dtype=g.dtype, device=g.device)
    out.index_add_(0, flat, g.reshape(-1, dim))
    yield m.weight, out.view(B, n, dim)
