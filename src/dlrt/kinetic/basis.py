"""Moment bases and quadratures for the entropy closure (docs/kinetic.md §1).

A :class:`Basis` is everything the closure and the solver need about velocity
space: the quadrature nodes ``v`` (``Q×d``), weights ``w`` (``Q``) and the basis
evaluated at the nodes, ``m`` (``Q×n``), so that ``⟨g⟩ = Σ_q w_q g(v_q)``.
Three kinds:

* ``monomial`` in 1D (slab geometry): ``m(μ) = (1, μ, …, μ^N)`` on ``[−1, 1]`` with
  Gauss–Legendre nodes (exact to degree ``2Q − 1``);
* ``monomial`` on the unit sphere: ``x^a y^b z^c`` with ``a + b + c ≤ N`` and
  ``c ≤ 1`` — on the sphere ``z² = 1 − x² − y²``, so these ``(N + 1)²``
  functions span the polynomials of degree ``≤ N`` without the linear
  dependence of the full monomial set;
* ``harmonic``: the real, orthonormal spherical harmonics of degree ``≤ N``.

Sphere quadratures are products: Gauss–Legendre in ``z = cos θ`` times the
trapezoidal rule in ``φ`` (exact for degree ``< 2 n_φ`` in ``φ``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Basis", "gauss_legendre", "make_basis", "sphere_quadrature"]

KINDS = ("monomial", "harmonic")
MAX_ORDER_SPHERE = 3


@dataclass(frozen=True)
class Basis:
    """Basis functions at quadrature nodes: ``m`` (``Q×n``), weights ``w`` (``Q``), nodes ``v`` (``Q×d``).

    ``kind``, ``order`` and ``dim`` name it (see :func:`make_basis`).
    """

    kind: str
    order: int
    dim: int
    v: Tensor
    w: Tensor
    m: Tensor

    @property
    def n(self) -> int:
        """Number of moments (``N + 1`` in 1D, ``(N + 1)²`` on the sphere)."""
        return self.m.shape[1]

    @property
    def mean(self) -> Tensor:
        """``⟨m⟩ / ⟨1⟩``: the moments of the isotropic density of unit mass."""
        return (self.w @ self.m) / self.w.sum()

    def to(self, device: Any = None, dtype: Any = None) -> Basis:
        return Basis(
            self.kind,
            self.order,
            self.dim,
            self.v.to(device, dtype),
            self.w.to(device, dtype),
            self.m.to(device, dtype),
        )

    def evaluate(self, v: Tensor) -> Tensor:
        """The basis at velocities ``v`` (``…×d``; in 1D also ``…``): ``…×n``."""
        return _evaluate(self.kind, self.order, self.dim, v)


def gauss_legendre(n: int, *, device: Any = None, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the ``n``-point Gauss–Legendre rule on ``[−1, 1]`` (Golub–Welsch).

    The nodes are the eigenvalues of the symmetric Jacobi matrix of the Legendre
    recurrence (off-diagonal ``k / √(4k² − 1)``), the weights ``2 v₀²`` from the
    first components of its eigenvectors. Computed in float64, then cast.
    """
    if n < 1:
        raise ValueError(f"a Gauss–Legendre rule needs n >= 1 points, got {n}")
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k**2 - 1)
    J = torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(J)
    weights = 2 * vecs[0] ** 2
    return nodes.to(device, dtype), weights.to(device, dtype)


def sphere_quadrature(
    n_mu: int, n_phi: int | None = None, *, device: Any = None, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """A product rule on the unit sphere: nodes ``Q×3`` and weights (summing to ``4π``).

    Gauss–Legendre in ``z`` with ``n_mu`` points times ``n_phi`` equispaced angles
    (default ``2 n_mu``); exact for polynomials of degree ``≤ min(2 n_mu − 1, n_phi − 1)``.
    """
    n_phi = 2 * n_mu if n_phi is None else n_phi
    if n_phi < 1:
        raise ValueError(f"n_phi must be >= 1, got {n_phi}")
    z, wz = gauss_legendre(n_mu)
    phi = (torch.arange(n_phi, dtype=torch.float64) + 0.5) * (2 * math.pi / n_phi)
    s = torch.sqrt(1 - z**2)
    x = (s[:, None] * torch.cos(phi)[None]).reshape(-1)
    y = (s[:, None] * torch.sin(phi)[None]).reshape(-1)
    zz = z[:, None].expand(n_mu, n_phi).reshape(-1)
    w = (wz[:, None] * (2 * math.pi / n_phi)).expand(n_mu, n_phi).reshape(-1)
    return torch.stack([x, y, zz], -1).to(device, dtype), w.to(device, dtype)


def _monomial_exponents(order: int) -> list[tuple[int, int, int]]:
    out = []
    for degree in range(order + 1):
        for c in (0, 1):
            for a in range(degree - c, -1, -1):
                b = degree - c - a
                if b >= 0:
                    out.append((a, b, c))
    return out


def _real_harmonics(v: Tensor, order: int) -> Tensor:
    """Real orthonormal spherical harmonics ``Y_l^k``, ``l ≤ order ≤ 3``, ``k = −l…l``, in Cartesian form."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    pi = math.pi
    out = [torch.full_like(x, 0.5 * math.sqrt(1 / pi))]
    if order >= 1:
        c = math.sqrt(3 / (4 * pi))
        out += [c * y, c * z, c * x]
    if order >= 2:
        c1, c2, c3 = 0.5 * math.sqrt(15 / pi), 0.25 * math.sqrt(5 / pi), 0.25 * math.sqrt(15 / pi)
        out += [c1 * x * y, c1 * y * z, c2 * (3 * z**2 - 1), c1 * x * z, c3 * (x**2 - y**2)]
    if order >= 3:
        out += [
            0.25 * math.sqrt(35 / (2 * pi)) * y * (3 * x**2 - y**2),
            0.5 * math.sqrt(105 / pi) * x * y * z,
            0.25 * math.sqrt(21 / (2 * pi)) * y * (5 * z**2 - 1),
            0.25 * math.sqrt(7 / pi) * z * (5 * z**2 - 3),
            0.25 * math.sqrt(21 / (2 * pi)) * x * (5 * z**2 - 1),
            0.25 * math.sqrt(105 / pi) * z * (x**2 - y**2),
            0.25 * math.sqrt(35 / (2 * pi)) * x * (x**2 - 3 * y**2),
        ]
    return torch.stack(out, -1)


def _evaluate(kind: str, order: int, dim: int, v: Tensor) -> Tensor:
    if dim == 1:
        mu = v[..., 0] if v.dim() > 1 and v.shape[-1] == 1 else v
        return mu[..., None] ** torch.arange(order + 1, device=v.device, dtype=v.dtype)
    if kind == "harmonic":
        return _real_harmonics(v, order)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack([x**a * y**b * z**c for a, b, c in _monomial_exponents(order)], -1)


def make_basis(
    kind: str = "monomial",
    order: int = 2,
    dim: int = 1,
    quadrature: int | None = None,
    *,
    device: Any = None,
    dtype: torch.dtype = torch.float64,
) -> Basis:
    """The basis ``kind`` of degree ``order`` in dimension ``dim`` (1: slab, 3: sphere) at its quadrature.

    Args:
        kind: ``"monomial"`` (1D or sphere) or ``"harmonic"`` (sphere).
        order: the degree ``N``: ``N ≥ 1`` in 1D, ``1 ≤ N ≤ 3`` on the sphere.
        dim: 1 or 3.
        quadrature: Gauss–Legendre points (1D; default ``max(2N + 2, 32)``) or points in ``z``
            of the product rule (sphere, with twice as many angles; default ``2N + 6``).
    """
    if kind not in KINDS:
        raise ValueError(f"basis kind {kind!r} is not one of {', '.join(KINDS)}")
    if dim not in (1, 3):
        raise ValueError(f"dim must be 1 (slab geometry) or 3 (unit sphere), got {dim}")
    if dim == 1 and kind != "monomial":
        raise ValueError("in 1D the basis is kind='monomial' (spherical harmonics need dim=3)")
    if order < 1 or (dim == 3 and order > MAX_ORDER_SPHERE):
        limit = f"1 <= order <= {MAX_ORDER_SPHERE}" if dim == 3 else "order >= 1"
        raise ValueError(f"order {order} is not supported in dim={dim}: use {limit}")
    if quadrature is not None and quadrature < order + 1:
        raise ValueError(f"quadrature={quadrature} points cannot integrate degree-{order} moments: use >= {order + 1}")
    if dim == 1:
        q = quadrature or max(2 * order + 2, 32)
        mu, w = gauss_legendre(q)
        v = mu[:, None]
    else:
        v, w = sphere_quadrature(quadrature or 2 * order + 6)
    m = _evaluate(kind, order, dim, v)
    return Basis(kind, order, dim, v.to(device, dtype), w.to(device, dtype), m.to(device, dtype))
