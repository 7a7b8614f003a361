"""Datasets for the examples and benchmarks (imported on demand, not by ``import dlrt``)."""

from .mnist import load_mnist

__all__ = ["load_mnist"]
