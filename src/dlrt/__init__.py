"""dlrt — dynamical low-rank training for PyTorch.

Weight matrices live as ``W = U S Vᵀ`` and are trained by geometric
integrators that adapt the rank on the fly::

    import dlrt
    model = dlrt.convert(model, rank=32, tau=0.1)
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.05)
    loss = opt.step(closure)
    dlrt.ranks(model), dlrt.compression(model)
    dlrt.export(model, (x,), "model.pt2")  # plain torch modules, loadable without dlrt
"""

from . import linalg, robust
from .conversion import compression, convert, lowrank_layers, parameter_counts, ranks, to_dense
from .exporting import export, to_plain
from .integrators import INTEGRATORS, Integrator
from .io import load, save
from .layers import FactorizedLayer, LowRankConv2d, LowRankLayer, LowRankLinear, TuckerConv2d
from .optimizer import DLRTOptimizer, NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "INTEGRATORS",
    "DLRTOptimizer",
    "FactorizedLayer",
    "Integrator",
    "LowRankConv2d",
    "LowRankLayer",
    "LowRankLinear",
    "NonFiniteError",
    "TuckerConv2d",
    "compression",
    "convert",
    "export",
    "linalg",
    "load",
    "lowrank_layers",
    "parameter_counts",
    "ranks",
    "robust",
    "save",
    "to_dense",
    "to_plain",
]
