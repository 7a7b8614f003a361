"""Neural entropy closures: an input-convex network for ``h`` and a plain network for ``α`` (docs/kinetic.md §4).

Both read the normalised moments without their zeroth component, ``x = (û₁, …, û_{n−1})``
(``û = u / u₀``), through a fixed diagonal affine map fitted to the training data.

* :class:`ICNN` — the structure-preserving closure (the "MK11" network of
  Schotthöfer et al. 2024): ``z₁ = σ(A₀x + b₀)``, ``z_{k+1} = σ(W_k z_k + A_k x + b_k)``
  with ``W_k ≥ 0`` elementwise and ``σ`` = softplus (convex, non-decreasing), and
  ``h = w·z_L + a·x + c`` with ``w ≥ 0``. Each ``z_k`` is then convex in ``x``, so ``h``
  is convex by construction (the weights are clamped at 0 in the forward pass,
  whatever their stored values; :meth:`ICNN.project` also clamps the stored
  weights after each optimizer step so that they keep receiving gradients).
  ``α_r = ∇ₓh`` by automatic differentiation.
* :class:`AlphaNet` — the non-structure-preserving baseline: an MLP ``x ↦ α_r``;
  ``h`` follows from ``α`` by the dual formula. Its hidden layers may be low-rank
  (``dlrt.convert`` + ``dlrt.DLRTOptimizer``).

Both complete ``α₀`` by normalisation (:func:`~dlrt.kinetic.closure.alpha0`) and
reconstruct ``u = ⟨m exp(α·m)⟩ + γ (0, α_r)``; :func:`predict` returns ``(h, α, u)``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .basis import Basis
from .closure import alpha0, entropy, moments

__all__ = ["ICNN", "MODELS", "AlphaNet", "build_network", "predict"]


class _Scaled(nn.Module):
    """A fixed diagonal affine map of the inputs, ``x̃ = (x − shift) / scale`` (it keeps convexity)."""

    def __init__(self, n_in: int) -> None:
        super().__init__()
        self.register_buffer("x_shift", torch.zeros(n_in))
        self.register_buffer("x_scale", torch.ones(n_in))

    def fit_inputs(self, x: Tensor) -> None:
        self.x_shift.copy_(x.mean(0))
        self.x_scale.copy_(x.std(0).clamp_min(1e-8))

    def scaled(self, x: Tensor) -> Tensor:
        return (x - self.x_shift) / self.x_scale


class ICNN(_Scaled):
    """An input-convex network ``h(x)``; ``width`` units in each of ``depth`` hidden layers.

    Raises:
        ValueError: ``n_in``, ``width`` or ``depth`` below 1.
    """

    kind = "icnn"

    def __init__(self, n_in: int, width: int = 350, depth: int = 3) -> None:
        if min(n_in, width, depth) < 1:
            raise ValueError(f"ICNN needs n_in, width, depth >= 1, got {n_in}, {width}, {depth}")
        super().__init__(n_in)
        self.first = nn.Linear(n_in, width)
        self.z = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth - 1))
        self.x = nn.ModuleList(nn.Linear(n_in, width) for _ in range(depth - 1))
        self.out_z = nn.Linear(width, 1, bias=False)
        self.out_x = nn.Linear(n_in, 1)
        self.register_buffer("h_scale", torch.ones(()))
        self.register_buffer("h_shift", torch.zeros(()))
        with torch.no_grad():
            for lin in (*self.z, self.out_z):  # non-negative, with the fan-in scaling of a softplus network
                lin.weight.uniform_(0, 2.0 / lin.in_features)

    def nonneg(self) -> list[nn.Parameter]:
        """The weights that must stay ``≥ 0`` (on the path ``z → z``)."""
        return [lin.weight for lin in (*self.z, self.out_z)]

    @torch.no_grad()
    def project(self, *_: object) -> None:
        """Clamp the ``z``-path weights at 0 (a step hook: projected gradient descent)."""
        for w in self.nonneg():
            w.clamp_(min=0)

    @torch.no_grad()
    def fit(self, x: Tensor, h: Tensor, alpha_r: Tensor) -> None:
        """Fit the input map, the (positive) output scale and the offset to training data.

        The offset makes the untrained network's mean match the data's: left to the
        output bias, a learning rate of 1e-3 would spend epochs on it.
        """
        self.fit_inputs(x)
        self.h_scale.copy_(h.std().clamp_min(1e-8))
        self.h_shift.zero_()
        self.h_shift.copy_(h.mean() - self(x).mean())

    def forward(self, x: Tensor) -> Tensor:
        xs = self.scaled(x)
        z = F.softplus(self.first(xs))
        for lz, lx in zip(self.z, self.x):
            z = F.softplus(F.linear(z, lz.weight.clamp(min=0)) + lx(xs))
        h = F.linear(z, self.out_z.weight.clamp(min=0)) + self.out_x(xs)
        return self.h_scale * h[..., 0] + self.h_shift


class AlphaNet(_Scaled):
    """A plain MLP ``x ↦ α_r`` (softplus hidden layers), the non-structure-preserving baseline."""

    kind = "alpha"

    def __init__(self, n_in: int, width: int = 350, depth: int = 3) -> None:
        if min(n_in, width, depth) < 1:
            raise ValueError(f"AlphaNet needs n_in, width, depth >= 1, got {n_in}, {width}, {depth}")
        super().__init__(n_in)
        dims = [n_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(width, n_in)
        self.register_buffer("a_shift", torch.zeros(n_in))
        self.register_buffer("a_scale", torch.ones(n_in))

    def fit(self, x: Tensor, h: Tensor, alpha_r: Tensor) -> None:
        self.fit_inputs(x)
        self.a_shift.copy_(alpha_r.mean(0))
        self.a_scale.copy_(alpha_r.std(0).clamp_min(1e-8))

    def forward(self, x: Tensor) -> Tensor:
        z = self.scaled(x)
        for lin in self.hidden:
            z = F.softplus(lin(z))
        return self.head(z) * self.a_scale + self.a_shift


MODELS = {"icnn": ICNN, "alpha": AlphaNet}


def build_network(model: str, n_moments: int, width: int, depth: int) -> nn.Module:
    """The network ``model`` (``"icnn"`` or ``"alpha"``) for ``n_moments`` moments (inputs: ``n_moments − 1``)."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not one of {', '.join(MODELS)}")
    return MODELS[model](n_moments - 1, width, depth)


def predict(
    model: nn.Module,
    u: Tensor,
    basis: Basis,
    gamma: float = 0.0,
    *,
    create_graph: bool = False,
    reconstruct: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(h, α, u_rec)`` of the network closure at normalised moments ``u`` (``B×n``, ``u₀ = 1``).

    For an :class:`ICNN`, ``α_r = ∇h`` by autograd (``create_graph=True`` when a loss
    on ``α`` or ``u`` is to be differentiated, i.e. in training); ``α₀`` completes the
    normalisation and ``u_rec = ⟨m exp(α·m)⟩ + γ (0, α_r)`` (``None`` with ``reconstruct=False``: what a
    solver needs is ``α`` only).
    """
    x = u[..., 1:]
    if isinstance(model, ICNN):
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            h = model(x)
            (alpha_r,) = torch.autograd.grad(h.sum(), x, create_graph=create_graph)
        if not create_graph:
            h = h.detach()
    else:
        alpha_r = model(x)
    alpha = torch.cat([alpha0(alpha_r, basis)[..., None], alpha_r], -1)
    if not isinstance(model, ICNN):
        h = entropy(alpha, u, basis, gamma)
    return h, alpha, moments(alpha, basis, gamma) if reconstruct else None
