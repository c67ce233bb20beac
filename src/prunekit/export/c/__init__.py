"""Export an INT8 prunekit model as portable C99 for microcontrollers, verified on the host.

:func:`export_c` writes ``model.h`` / ``model.c`` (integer-only kernels, ``const`` weights in flash,
dense or compressed-sparse per layer, one static activation arena sized by liveness), a ``Makefile``
whose ``make check`` compiles a generated harness and compares the C outputs bit for bit with the NumPy
reference (:mod:`prunekit.export.c.reference`) and its predictions with PyTorch's, and ``budget.json``
(flash and RAM per layer). The arithmetic and every scale come from the integer int8 model
(:mod:`prunekit.quant.rounding`, :mod:`prunekit.quant.graph`): the C library computes the integers the
PyTorch model computes; ``docs/c_export.md`` is the user's guide.
"""

from prunekit.export.c.api import CModel, build, export_c, load_budget
from prunekit.export.c.harness import arm_size, run_check

__all__ = ["CModel", "arm_size", "build", "export_c", "load_budget", "run_check"]
