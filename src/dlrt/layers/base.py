"""The common part of every matrix-format low-rank layer.

A layer holds ``W = U S Vᵀ`` as three parameters and computes its forward in
two thin products (``x ↦ xV ↦ (xV)Sᵀ Uᵀ``), never forming ``W``. Its backward
returns, besides the input gradient, the projected gradients the integrators
need (docs/algorithms.md §0), from the same two thin products:

* ``G V   = Δᵀ (X V)``       — the K-gradient (``n×r``), kept in ``grad_K``
* ``Gᵀ U  = Xᵀ (Δ U)``       — the L-gradient (``m×r``), kept in ``grad_L``
* ``Uᵀ G V = (Δ U)ᵀ (X V)``  — the S-gradient (``r×r``), in ``S.grad``

A subclass supplies the four shape-specific products (``_project_in``,
``_project_out``, ``_basis_grad_in``, ``_input_grad``) and the dense conversion.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import linalg
from .ranks import check_rank

GRAD_KINDS = frozenset({"K", "L", "X"})


class _LowRankFunction(torch.autograd.Function):
    """y = scale · project_out(project_in(x, V) Sᵀ, U) + b with the projected gradients in backward.

    ``scale`` (an adapter's ``lora_alpha / r``) is applied to the ``r``-channel
    quantities (the core in the forward, ``Δ U`` and ``G V`` in the backward),
    never to a full-width activation or gradient; the recorded pass inputs
    carry it (``(x, Δ, scale)``) for :meth:`LowRankLayer.project_grad`.

    Where the dense weight is the cheaper route (:meth:`LowRankLayer.uses_dense_kernel`),
    the forward applies ``W = U S Vᵀ`` and the backward forms the weight gradient
    ``G`` once and projects it: the same quantities, fewer operations for a
    small weight such as a first convolution (1→20 channels, 5×5).
    """

    @staticmethod
    def forward(ctx, x, U, S, V, bias, layer, scale=1.0):  # type: ignore[override]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            x, U, S, V = (t.to(dt) for t in (x, U, S, V))
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            ctx.dense = layer.uses_dense_kernel(x)
            core = S if scale == 1.0 else S * scale
            if ctx.dense:
                a = (U @ core) @ V.mT  # scale · W, kept for the input gradient
                y = layer._dense_apply(x, a, bias)
            else:
                a = layer._project_in(x, V)  # X V
                y = layer._project_out(layer._mul_core(a, core.mT), U, bias)
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.scale = scale
        ctx.save_for_backward(x, U, S, V, a)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, U, S, V, a = ctx.saved_tensors
        layer = ctx.layer
        request = layer.grad_request
        need_x, need_U, need_S, need_V, need_b, *_ = ctx.needs_input_grad
        dy = dy.to(x.dtype)
        plain = request is None
        want_K = (plain and need_U) or (request is not None and "K" in request)
        want_L = (plain and need_V) or (request is not None and "L" in request)
        keep = request is not None and "X" in request
        scale = ctx.scale

        if ctx.dense:  # dense route (a = scale · W): G once, then its projections
            G = layer._dense_weight_grad(x, dy)  # n×m
            G = G if scale == 1.0 else G * scale
            GV = G @ V
            gK = GV if want_K else None  # G V
            gL = G.mT @ U if want_L else None  # Gᵀ U
            gS = U.mT @ GV if need_S else None  # Uᵀ G V
            gx = layer._dense_input_grad(dy, a, ctx.x_shape) if need_x else None
            if keep:
                layer.__dict__.setdefault("pass_inputs", []).append(G)  # (a layer pickled before it had one)
        else:
            if keep:
                # Kept for Lᵀ G R in other bases later (LowRankLayer.project_grad): the BUG S-step.
                layer.__dict__.setdefault("pass_inputs", []).append((x, dy) if scale == 1.0 else (x, dy, scale))
            b = layer._project_out_adjoint(dy, U)  # Δ U
            gK = layer._contract(dy, a) if want_K else None  # G V
            if scale != 1.0:
                b = b * scale
                gK = None if gK is None else gK * scale
            gL = layer._basis_grad_in(x, b) if want_L else None  # Gᵀ U
            gS = layer._contract(b, a) if need_S else None  # Uᵀ G V
            gx = layer._input_grad(layer._mul_core(b, S), V, ctx.x_shape) if need_x else None
        gb = layer._bias_grad(dy) if (need_b and ctx.has_bias) else None

        gU = gV = None
        if plain:
            gU = gK @ S.mT if need_U else None
            gV = gL @ S if need_V else None
        else:
            layer._accumulate(gK, gL)
            if gS is not None:
                gS = _carry_nonfinite(gS, gK, gL)
        return gx, gU, gS, gV, gb, None, None


def _carry_nonfinite(gS: Tensor, *others: Tensor | None) -> Tensor:
    """``gS``, made NaN if any of ``others`` holds inf/NaN; no host sync.

    ``G V`` and ``Gᵀ U`` are not ``.grad`` of any parameter, so a check that reads
    only ``.grad`` (``torch.amp.GradScaler``'s overflow check, ``clip_grad_norm_``'s
    ``error_if_nonfinite``) would miss an overflow in them; through ``S.grad`` it
    sees it.
    """
    total = None
    for g in others:
        if g is not None:
            # Half-precision sums of finite values could overflow: sum them in float32.
            part = g.sum(dtype=torch.float32) if g.dtype in (torch.float16, torch.bfloat16) else g.sum()
            total = part if total is None else total + part
    # 0·Σ is 0 for finite values and NaN for any inf/NaN; cheaper than isfinite().all() on n×r.
    return gS if total is None else gS + total.to(gS.dtype) * 0


class FactorizedLayer(nn.Module):
    """What every factorized layer offers the optimizer, checkpoints and tools: orthonormal bases and a core.

    A matrix layer (:class:`LowRankLayer`, ``W = U S Vᵀ``) has two bases and a
    ``r_u×r_v`` core; a Tucker layer (:class:`~dlrt.layers.TuckerConv2d`) has one
    basis per mode of its kernel and a core with as many modes. Integrators
    move both through the operations of :mod:`dlrt.integrators.base`.
    """

    min_rank: int
    max_rank: int
    grad_request: frozenset[str] | None

    @property
    def core(self) -> nn.Parameter:
        """The core (``S`` of a matrix layer, ``C`` of a Tucker layer)."""
        raise NotImplementedError

    @property
    def bases(self) -> tuple[nn.Parameter, ...]:
        """The orthonormal bases, one per mode (``(U, V)`` for a matrix layer)."""
        raise NotImplementedError

    def factor_parameters(self) -> tuple[nn.Parameter, ...]:
        """Bases and core in the order the optimizer keeps them (its state indices follow it)."""
        raise NotImplementedError

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of every mode: the core's shape."""
        return tuple(self.core.shape)

    def clear_pass(self) -> None:
        raise NotImplementedError

    @property
    def contraction(self) -> str:
        """``"auto"`` (default), ``"thin"`` or ``"dense"``: how the forward and backward contract
        (the subclass's ``uses_dense_kernel``)."""
        return getattr(self, "_contraction", "auto")

    @contraction.setter
    def contraction(self, value: str) -> None:
        if value not in ("auto", "thin", "dense"):
            raise ValueError(f"contraction must be 'auto', 'thin' or 'dense', got {value!r}")
        self._contraction = value

    @torch.no_grad()
    def _replace_factors(self, tensors: tuple[Tensor, ...]) -> None:
        """Replace the data of :meth:`factor_parameters` (in their order; shapes may change); clears the pass."""
        for p, t in zip(self.factor_parameters(), tensors, strict=True):
            # Row-major always: BLAS rounds differently on other layouts (LAPACK returns Q
            # column-major), and a checkpoint must resume bit-identically.
            _replace_data(p, t.detach().to(dtype=p.dtype, device=p.device).contiguous())
        self.clear_pass()

    @torch.no_grad()
    def set_core(self, core: Tensor) -> None:
        """Replace the core only (same shape), e.g. after an S-step; clears all recorded gradients."""
        mine = self.core
        if core.shape != mine.shape:
            raise ValueError(f"core {tuple(core.shape)} does not match the current core {tuple(mine.shape)}")
        _replace_data(mine, core.detach().to(dtype=mine.dtype, device=mine.device).contiguous())
        self.clear_pass()

    def num_parameters(self) -> int:
        """Parameters stored by the layer: bases, core and the bias."""
        bias = getattr(self, "bias", None)
        return sum(p.numel() for p in self.factor_parameters()) + (bias.numel() if bias is not None else 0)


class LowRankLayer(FactorizedLayer):
    """Base class of matrix-format low-rank layers ``W = U S Vᵀ`` (``n×m``).

    Attributes:
        U, S, V: the factors as parameters; their shapes change when the rank
            changes (the parameter objects stay the same).
        min_rank, max_rank: bounds the integrators keep the rank in.
        grad_request: ``None`` for plain autograd (true gradients of U, S, V);
            a subset of ``{"K", "L", "X"}`` when an integrator drives the layer: the
            backward then records ``G V`` in ``grad_K`` and/or ``Gᵀ U`` in
            ``grad_L``, and with ``"X"`` keeps its input and output gradient
            for :meth:`project_grad`; U, V receive no ``.grad`` (the
            integrator moves them on the manifold, never by a gradient step).
        grad_K, grad_L: the recorded projected gradients (accumulated like
            ``.grad``), or ``None``.
        pass_inputs: what every backward since the gradients were last
            cleared recorded under ``"X"``: ``(input, output gradient)`` (and the
            output scale of the pass when it is not 1), or the weight gradient
            ``G`` on the dense route.
        contraction: ``"auto"`` (default), ``"thin"`` or ``"dense"``: how the
            forward and backward contract (:meth:`uses_dense_kernel`).
    """

    out_dim: int
    in_dim: int

    def _init_factors(
        self,
        rank: int,
        max_rank: int | None,
        min_rank: int,
        device: Any,
        dtype: Any,
    ) -> None:
        full = min(self.out_dim, self.in_dim)
        shape = (self.out_dim, self.in_dim)
        check_rank(rank, shape)
        if max_rank is None:
            max_rank = full
        check_rank(max_rank, shape, what="max_rank")
        check_rank(min_rank, shape, what="min_rank")
        if min_rank > max_rank:
            raise ValueError(f"min_rank={min_rank} is larger than max_rank={max_rank}")
        self.max_rank = int(max_rank)
        self.min_rank = int(min_rank)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(self.out_dim, rank, **kw))
        self.S = nn.Parameter(torch.empty(rank, rank, **kw))
        self.V = nn.Parameter(torch.empty(self.in_dim, rank, **kw))
        self.grad_request: frozenset[str] | None = None
        # Set for a fresh adapter (S = 0 on placeholder bases): the parallel integrator's
        # next step grows the bases from the gradient instead of augmenting them.
        self.pending_growth = False
        self.just_grown = False  # bases just grown from the gradient: the cycle's end keeps the rank
        self.grad_K: Tensor | None = None
        self.grad_L: Tensor | None = None
        self.pass_inputs: list[tuple[Tensor, Tensor] | Tensor] = []
        self._contraction = "auto"

    # ----------------------------------------------------------------- factors
    @property
    def core(self) -> nn.Parameter:
        return self.S

    @property
    def bases(self) -> tuple[nn.Parameter, ...]:
        return (self.U, self.V)

    def factor_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.U, self.S, self.V)

    @property
    def rank(self) -> int:
        """Current rank ``r`` (the number of columns of U)."""
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)`` of the matrix ``W``."""
        return (self.out_dim, self.in_dim)

    @torch.no_grad()
    def set_factors(self, U: Tensor, S: Tensor, V: Tensor) -> None:
        """Replace the factors (ranks may change); clears all gradients.

        ``S`` may be rectangular (``r_u×r_v``) while an integrator holds the
        layer on an augmented basis.
        """
        if U.shape[0] != self.out_dim or V.shape[0] != self.in_dim:
            raise ValueError(
                f"factors of shape U{tuple(U.shape)}, V{tuple(V.shape)} do not fit a {self.out_dim}×{self.in_dim} layer"
            )
        if S.shape != (U.shape[1], V.shape[1]):
            raise ValueError(f"S{tuple(S.shape)} does not match U{tuple(U.shape)}, V{tuple(V.shape)}")
        self._replace_factors((U, S, V))

    def clear_pass(self) -> None:
        """Forget what the last backward passes recorded (projected gradients, pass inputs)."""
        self.grad_K = self.grad_L = None
        self.pass_inputs = []

    @torch.no_grad()
    def init_from_matrix(self, W: Tensor, rank: int | None = None, tau: float | None = None) -> None:
        """Set the factors to a truncated SVD of the dense matrix ``W`` (``n×m``).

        With ``tau`` the rank follows the truncation rule of docs/algorithms.md §1
        (relative), clamped to ``[min_rank, rank or max_rank]``; otherwise it is
        ``rank`` (default: the current rank).
        """
        W = W.detach().to(self.U.dtype)
        if tuple(W.shape) != self.shape:
            raise ValueError(f"W has shape {tuple(W.shape)}, the layer is {self.out_dim}×{self.in_dim}")
        if rank is not None:
            check_rank(rank, self.shape)
        r_cap = self.max_rank if rank is None else rank
        if tau is None:
            r = self.rank if rank is None else rank
            full = min(W.shape)
            if r <= full // 4 and full > 256:
                # Randomized range finder: the top-r subspace of a large matrix
                # without a full SVD (Halko et al. 2011).
                Uq, sq, Vq = torch.svd_lowrank(W.float(), q=min(r + 10, full), niter=3)
                U, sigma, V = (t.to(W.dtype) for t in (Uq[:, :r], sq[:r], Vq[:, :r]))
            else:
                work = W.to(linalg._qr_dtype(W.dtype))
                Uf, sf, Vh = torch.linalg.svd(work, full_matrices=False)
                U, sigma, V = Uf[:, :r].to(W.dtype), sf[:r].to(W.dtype), Vh[:r].mT.to(W.dtype)
        else:
            work = W.to(linalg._qr_dtype(W.dtype))
            Uf, sf, Vh = torch.linalg.svd(work, full_matrices=False)
            r = linalg.truncation_rank(sf, tau, min_rank=self.min_rank, max_rank=r_cap)
            U, sigma, V = Uf[:, :r].to(W.dtype), sf[:r].to(W.dtype), Vh[:r].mT.to(W.dtype)
        self.set_factors(U, torch.diag(sigma), V)

    def matrix(self) -> Tensor:
        """Dense ``W = U S Vᵀ`` as an ``n×m`` matrix (differentiable; for inspection and tests)."""
        return self.U @ self.S @ self.V.mT

    def projected_grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(G V, Gᵀ U, Uᵀ G V)`` recorded by the last backward passes."""
        return self.grad_K, self.grad_L, self.S.grad

    def project_grad(
        self, left: Tensor, right: Tensor | None, records: list[tuple[Tensor, Tensor] | Tensor] | None = None
    ) -> Tensor | None:
        """``leftᵀ G right`` for the layer's weight gradient ``G`` of the recorded passes (``grad_request`` ``"X"``).

        ``G = Σ Δᵀ X`` over the backward passes since the gradients were cleared
        (``records``, default :attr:`pass_inputs`: taken before a basis change
        clears them), contracted through the same thin products as the
        backward (never formed): ``(Δ left)ᵀ (X right)``; ``right=None`` gives
        ``leftᵀ G`` (``k×m``), as the backward forms ``Gᵀ U``. ``None`` when
        nothing was recorded.
        """
        out = None
        for entry in self.pass_inputs if records is None else records:
            if isinstance(entry, Tensor):  # the dense route kept G itself
                g = left.to(entry.dtype).mT @ entry
                g = g if right is None else g @ right.to(entry.dtype)
            else:
                x, dy, *scale = entry  # (x, Δ) or (x, Δ, scale) of a pass with an output scale
                b = self._project_out_adjoint(dy, left.to(dy.dtype))  # Δ L
                if right is None:
                    g = self._basis_grad_in(x, b).mT  # (Xᵀ Δ L)ᵀ
                else:
                    g = self._contract(b, self._project_in(x, right.to(x.dtype)))  # (Δ L)ᵀ (X R)
                g = g * scale[0] if scale else g
            out = g if out is None else out + g
        return None if out is None else out.to(left.dtype)

    def uses_dense_kernel(self, x: Tensor) -> bool:
        """Whether a pass on input ``x`` goes through the dense weight ``W = U S Vᵀ`` rather than thin products.

        Both routes compute the same output and the same projected gradients.
        Per output position the thin route costs about ``m r_v + r_v r_u + r_u n``
        multiply-adds, the dense one ``n m`` (plus ``n m r`` once to form ``W``),
        for ``W`` of shape ``n×m`` and a core ``r_u×r_v``; ``"auto"`` takes the
        cheaper. ``self.contraction`` set to ``"thin"`` or ``"dense"`` forces a route.
        """
        if self.contraction != "auto":
            return self.contraction == "dense"
        n, m = self.out_dim, self.in_dim
        r_u, r_v = self.S.shape
        positions = x.numel() // self._input_width(x)
        thin = m * r_v + r_v * r_u + r_u * n
        return n * m * (positions + min(r_u, r_v)) < thin * positions

    @staticmethod
    def _input_width(x: Tensor) -> int:
        """Entries of ``x`` per position: ``x.numel()`` over it counts the positions the layer is applied at."""
        raise NotImplementedError

    def dense_num_parameters(self) -> int:
        """Parameters of the dense twin of this layer."""
        bias = getattr(self, "bias", None)
        return self.out_dim * self.in_dim + (bias.numel() if bias is not None else 0)

    # ---------------------------------------------------------------- autograd
    def _accumulate(self, gK: Tensor | None, gL: Tensor | None) -> None:
        if gK is not None:
            gK = gK.to(self.U.dtype)
            self.grad_K = gK if self.grad_K is None else self.grad_K + gK
        if gL is not None:
            gL = gL.to(self.V.dtype)
            self.grad_L = gL if self.grad_L is None else self.grad_L + gL

    def _apply_lowrank(self, x: Tensor, bias: Tensor | None, scale: float = 1.0) -> Tensor:
        return _LowRankFunction.apply(x, self.U, self.S, self.V, bias, self, float(scale))

    @staticmethod
    def _mul_core(a: Tensor, C: Tensor) -> Tensor:
        """Right-multiply the r channels of ``a`` by the small matrix ``C``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"out={self.out_dim}, in={self.in_dim}, rank={self.rank}, "
            f"min_rank={self.min_rank}, max_rank={self.max_rank}"
        )


def _replace_data(p: nn.Parameter, t: Tensor) -> None:
    """Swap a parameter's data for a tensor of another shape, keeping the parameter object.

    Autograd caches a leaf's gradient accumulator, with the leaf's shape, for as
    long as any graph holds it (a loss the caller kept, say), and assigning
    ``.data`` refreshes that cache only when the dtype or device changes. A
    brief assignment of another dtype forces the refresh, so the next forward
    expects a gradient of the new shape.
    """
    if p.shape != t.shape:
        other = torch.float64 if p.dtype != torch.float64 else torch.float32
        p.data = torch.empty(0, dtype=other, device=p.device)
    p.data = t
    p.grad = None


def default_dense_init(out_dim: int, in_dim: int, device: Any = None, dtype: Any = None) -> Tensor:
    """The weight ``nn.Linear``/``nn.Conv2d`` would start from (kaiming-uniform, a=√5)."""
    W = torch.empty(out_dim, in_dim, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(W, a=math.sqrt(5))
    return W
