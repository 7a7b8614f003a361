"""Neural entropy closures for the Boltzmann moment system (docs/kinetic.md).

Moment bases and quadratures (:mod:`.basis`), the regularized Maxwell–Boltzmann
entropy closure and its batched Newton solver (:mod:`.closure`), training data
sampled in multiplier space (:mod:`.data`), the input-convex and the plain
networks (:mod:`.networks`), a 1D M_N kinetic solver (:mod:`.solver`) and the
``dlrt closure train | solve`` recipes (:mod:`.train`)."""

from .basis import Basis, gauss_legendre, make_basis, sphere_quadrature
from .closure import (
    NewtonResult,
    alpha0,
    check_realizable,
    dual_gradient,
    dual_hessian,
    dual_objective,
    entropy,
    moments,
    newton,
    normalize,
    realizable,
    scale_back,
)
from .config import ClosureConfig
from .data import ClosureData, load_data, sample, save_data
from .networks import ICNN, AlphaNet, build_network, predict
from .solver import CASES, NetworkClosure, NewtonClosure, Problem, Solution, periodic_case, solve, source_case
from .train import ClosureRun, closure_errors, load_closure, solve_run, train_closure

__all__ = [
    "CASES",
    "ICNN",
    "AlphaNet",
    "Basis",
    "ClosureConfig",
    "ClosureData",
    "ClosureRun",
    "NetworkClosure",
    "NewtonClosure",
    "NewtonResult",
    "Problem",
    "Solution",
    "alpha0",
    "build_network",
    "check_realizable",
    "closure_errors",
    "dual_gradient",
    "dual_hessian",
    "dual_objective",
    "entropy",
    "gauss_legendre",
    "load_closure",
    "load_data",
    "make_basis",
    "moments",
    "newton",
    "normalize",
    "periodic_case",
    "predict",
    "realizable",
    "sample",
    "save_data",
    "scale_back",
    "solve",
    "solve_run",
    "source_case",
    "sphere_quadrature",
    "train_closure",
]
