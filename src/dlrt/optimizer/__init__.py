"""``DLRTOptimizer``: the torch.optim-style object users drive, one file per reason to change.

* ``core.py``: the class, its construction and validation, the step and the passes an
  integrator asks for (``evaluate``, ``S_grad``, ``pass_grad``), the phase of a cycle;
* ``checks.py``: what fails a step (:class:`NonFiniteError`: non-finite losses,
  gradients and updates);
* ``rollback.py``: how a failed step is undone (snapshot, restore, the buffer guard);
* ``processes.py``: process-group averaging, rank agreement and consistency checks;
* ``scaling.py``: GradScaler's unscaling and clipping by ``max_grad_norm``;
* ``state.py``: ``state_dict``, ``check_state_dict``, ``load_state_dict``.

The parts other than ``core.py`` are mixins of :class:`DLRTOptimizer`: each lists at its
top the attributes of the optimizer it reads.
"""

from .checks import NonFiniteError
from .core import DLRTOptimizer

# A model pickled while an optimizer guarded its buffers refers to this (rollback.py, _BufferHook).
from .rollback import _make_inert_hook  # noqa: F401

__all__ = ["DLRTOptimizer", "NonFiniteError"]
