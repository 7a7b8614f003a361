"""Splitting a training set among federated clients: IID, or non-IID by a Dirichlet prior over the labels."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["dataset_tensors", "partition"]


def partition(
    labels: Tensor, clients: int, *, alpha: float | None = None, seed: int = 0, min_size: int = 1
) -> list[Tensor]:
    """Indices of each client's share of a dataset with the given ``labels``.

    ``alpha=None``: IID, a seeded random permutation cut into ``clients`` parts of
    (almost) equal size. ``alpha > 0``: for every class, the proportions of its
    samples that go to each client are drawn from ``Dirichlet(alpha, …, alpha)``
    (small ``alpha``: each client sees few classes; ``alpha = 0.1`` is the usual
    strongly non-IID setting). Draws are repeated (seeded) until every client holds
    at least ``min_size`` samples. The same ``(labels, clients, alpha, seed)`` always
    gives the same split, on every machine: every client can compute its own share.

    Returns a list of ``clients`` sorted index tensors that together cover every
    sample exactly once.
    """
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    n = labels.numel()
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be a positive int, got {clients!r}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0 (or None for IID), got {alpha}")
    if n < clients * min_size:
        raise ValueError(
            f"{n} samples cannot give {clients} clients at least {min_size} each: use fewer clients or more data"
        )
    gen = torch.Generator().manual_seed(int(seed))
    if alpha is None:
        order = torch.randperm(n, generator=gen)
        return [part.sort().values for part in order.tensor_split(clients)]
    classes = labels.unique()
    for _ in range(1000):
        shares: list[list[Tensor]] = [[] for _ in range(clients)]
        for c in classes.tolist():
            idx = (labels == c).nonzero().reshape(-1)
            idx = idx[torch.randperm(idx.numel(), generator=gen)]
            # Dirichlet(α) as normalised Gamma(α, 1) draws; torch's samplers take no generator, so the
            # Gamma draws come from a fork of the global RNG seeded from ``gen``.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
                g = torch._standard_gamma(torch.full((clients,), float(alpha), dtype=torch.float64))
            p = g / g.sum() if float(g.sum()) > 0 else torch.full((clients,), 1.0 / clients, dtype=torch.float64)
            cuts = (p.cumsum(0) * idx.numel()).round().long().clamp(max=idx.numel())
            cuts[-1] = idx.numel()
            start = 0
            for k, end in enumerate(cuts.tolist()):
                shares[k].append(idx[start:end])
                start = max(start, end)
        parts = [torch.cat(s).sort().values for s in shares]
        if min(p.numel() for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples gives each of {clients} clients {min_size} samples "
        "in 1000 draws: use a larger alpha or fewer clients"
    )


def dataset_tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of an in-memory dataset: an :class:`~dlrt.data.datasets.ImageDataset`, a
    :class:`~torch.utils.data.TensorDataset`, or a :class:`~torch.utils.data.Subset` of either."""
    if isinstance(dataset, torch.utils.data.Subset):
        x, y = dataset_tensors(dataset.dataset)
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return x[idx], y[idx]
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if hasattr(dataset, "data") and hasattr(dataset, "targets"):
        return dataset.data, dataset.targets
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])
