"""Adversarial robustness of low-rank networks: the condition-number regularizer and two attacks.

"Dynamical Low-Rank Compression of Neural Networks with Robustness under Adversarial
Attacks" (Schotthöfer, Yang, Schnake, 2025). With orthonormal bases, a layer's
condition number is its core's, ``cond(U S Vᵀ) = cond(S)``; a small condition number
bounds how much the layer can amplify a perturbation relative to the signal. The
regularizer (docs/robustness.md)

    ℛ(S) = ‖S Sᵀ − (‖S‖²_F / r) I_r‖_F        (S: r rows)

is zero exactly when ``S`` is a scaled orthogonal matrix (all singular values
equal) and grows with their spread. A Tucker layer contributes its core's mode-0
unfolding.

The attacks take inputs in **pixel space** ``[0, 1]`` and ε in the same units,
whatever normalisation the model expects: pass the dataset's ``mean``/``std`` and the
attack normalises inside, before the model. An input outside ``[0, 1]`` is refused
(it is most likely already normalised), so ε cannot silently mean something else.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import linalg
from .conversion import lowrank_layers
from .layers import TuckerConv2d

__all__ = ["condition_numbers", "condition_regularizer", "core_matrix", "fgsm", "pgd", "regularizer"]


# ------------------------------------------------------------------------------------------- regularizer
def core_matrix(layer: nn.Module) -> Tensor:
    """The matrix whose condition number is the layer's: ``S``, or a Tucker core's mode-0 unfolding."""
    if isinstance(layer, TuckerConv2d):
        return linalg.unfold(layer.C, 0)
    return layer.S


class _SafeNorm(torch.autograd.Function):
    """``‖A‖_F`` with the gradient ``A/‖A‖_F``, and 0 (a subgradient) where ``A = 0``."""

    @staticmethod
    def forward(ctx, A):  # type: ignore[override]
        norm = torch.linalg.matrix_norm(A)
        ctx.save_for_backward(A, norm)
        return norm

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        A, norm = ctx.saved_tensors
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return torch.where(norm > 0, g / safe, torch.zeros_like(g)) * A


def regularizer(S: Tensor) -> Tensor:
    """``ℛ(S) = ‖S Sᵀ − (‖S‖²_F / r) I_r‖_F`` for a matrix ``S`` with ``r`` rows (differentiable).

    Zero exactly for a scaled orthogonal ``S`` (or ``S = 0``); there its gradient is
    0, a subgradient of the norm, by construction (the textbook ``sqrt(sum(A²))``
    would give 0/0 = NaN).
    """
    if S.dim() != 2:
        raise ValueError(f"the regularizer takes a matrix, got a tensor of shape {tuple(S.shape)}")
    r = S.shape[0]
    gram = S @ S.mT
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    return _SafeNorm.apply(gram - (S.square().sum() / r) * eye)


def condition_regularizer(model: nn.Module) -> Tensor:
    """``Σ ℛ(S)`` over every low-rank layer of ``model`` (matrix cores; Tucker cores' mode-0 unfoldings).

    Add ``β ·`` this to the loss (``dlrt train robust_beta=β``). Raises
    ``ValueError`` for a model without low-rank layers.
    """
    terms = [regularizer(core_matrix(layer)) for _, layer in lowrank_layers(model)]
    if not terms:
        raise ValueError("the model has no low-rank layers: convert it first (dlrt.convert)")
    return torch.stack(terms).sum()


@torch.no_grad()
def condition_numbers(model: nn.Module) -> dict[str, float]:
    """``cond(S) = σ_max / σ_min`` of every low-rank layer's core (``inf`` for a singular core)."""
    out = {}
    for name, layer in lowrank_layers(model):
        sigma = torch.linalg.svdvals(core_matrix(layer).detach().double())
        out[name] = float(sigma[0] / sigma[-1]) if float(sigma[-1]) > 0 else math.inf
    return out


# ------------------------------------------------------------------------------------------- attacks
def _check_eps(eps: Any, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (in pixel units, [0, 1] images), got {eps!r}")
    return float(eps)


def _check_pixels(x: Tensor) -> None:
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(
            f"x holds values in [{float(x.min()):.3g}, {float(x.max()):.3g}], not pixel values in [0, 1]: pass "
            "unnormalised images (e.g. get_dataset(..., normalize=False)) and the dataset's mean= and std=, "
            "and the attack normalises them for the model"
        )


def _normalizer(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Any:
    if (mean is None) != (std is None):
        raise ValueError("pass both mean= and std= (the dataset's normalisation), or neither")
    if mean is None:
        return lambda t: t
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    if bool((s <= 0).any()):
        raise ValueError(f"std must be positive, got {std!r}")
    return lambda t: (t - m) / s


@contextlib.contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode, and factorized layers on plain autograd; both restored exactly afterwards.

    Eval mode: BatchNorm uses (and does not update) its running statistics,
    dropout is off. Plain autograd: a low-rank layer driven by an optimizer would
    otherwise record projected gradients of the attack's backward passes.
    """
    modes = [(m, m.training) for m in model.modules()]
    requests = [(m, m.grad_request) for _, m in lowrank_layers(model)]
    try:
        model.eval()
        for m, _ in requests:
            m.grad_request = None
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, request in requests:
            m.grad_request = request


def _input_grad(model: nn.Module, normalize: Any, x: Tensor, y: Tensor) -> Tensor:
    """∂ CE(model(normalize(x)), y) / ∂x (mean over the batch), without touching any parameter's .grad."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(normalize(x)), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _prepare(model: nn.Module, x: Tensor, y: Tensor, eps: Any, mean: Any, std: Any) -> tuple[float, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x must be a batch (N, ...) and y its N labels, got x{tuple(x.shape)}, y{tuple(y.shape)}")
    eps = _check_eps(eps)
    _check_pixels(x)
    return eps, _normalizer(x, mean, std)


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Fast gradient sign method: ``clamp(x + ε · sign(∇ₓ CE), 0, 1)`` (Goodfellow et al. 2015).

    Args:
        model: the classifier; put in eval mode for the attack and restored.
        x: images in pixel space ``[0, 1]``, a batch ``(N, C, H, W)``.
        y: their labels.
        eps: L∞ budget in pixel units.
        mean, std: the normalisation the model expects (the dataset's); the
            attack applies it before the model. None: the model takes pixels.

    Returns:
        The adversarial images, in pixel space.
    """
    eps, normalize = _prepare(model, x, y, eps, mean, std)
    with _attack_mode(model):
        grad = _input_grad(model, normalize, x, y)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(p=2, dim=1).reshape((-1,) + (1,) * (t.dim() - 1))


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    seed: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Projected gradient descent on the loss (Madry et al. 2018), in the L∞ or L2 ball of radius ε.

    Each step moves along ``sign(∇ₓ CE)`` (L∞) or ``∇ₓ CE / ‖∇ₓ CE‖₂`` per sample (L2)
    by ``step_size`` (default ``2.5 ε / steps``), projects back into the ε-ball around
    ``x`` and clamps to ``[0, 1]``. ``random_start`` begins at a uniform point of the
    L∞ ball, or for L2 at a random direction scaled by ``ε·u``, ``u ~ U(0, 1)`` per sample
    (as torchattacks does), drawn from a generator seeded with ``seed`` (None: from
    the global RNG, which is then advanced). Other arguments as :func:`fgsm`.
    """
    eps, normalize = _prepare(model, x, y, eps, mean, std)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    alpha = 2.5 * eps / steps if step_size is None else _check_eps(step_size, "step_size")
    x = x.detach()
    if eps == 0:
        return x.clone()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))
    adv = x.clone()
    if random_start:
        if norm == "linf":
            adv = adv + torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        else:
            delta = torch.empty_like(x).normal_(generator=generator)
            r = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(0, 1, generator=generator)
            delta = delta * (r.reshape(_per_sample_norm(delta).shape) / _per_sample_norm(delta) * eps)
            adv = adv + delta
        adv = adv.clamp(0.0, 1.0)
    with _attack_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, normalize, adv, y)
            if norm == "linf":
                adv = adv + alpha * grad.sign()
                delta = (adv - x).clamp(-eps, eps)
            else:
                adv = adv + alpha * grad / (_per_sample_norm(grad) + 1e-10)
                delta = adv - x
                delta = delta * torch.clamp(eps / _per_sample_norm(delta), max=1.0)
            adv = (x + delta).clamp(0.0, 1.0)
    return adv
