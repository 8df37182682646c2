"""The shared vocabulary of sizes and the input of every step.

``d`` width, ``N`` tokens (known only at run time), ``K`` heads, ``p`` head dimension,
``m`` dictionary atoms. ``Z`` (d x N) is the input of a step, tokens as columns.
"""

import sympy as sp

N, d, p, K, m = sp.symbols("N d p K m", positive=True, integer=True)
Z = sp.MatrixSymbol("Z", d, N)
SIZES = {"N": N, "d": d, "p": p, "K": K, "m": m}


def size_value(expr: sp.Expr, sizes: dict[str, int]) -> int:
    """The integer a size expression (``d``, ``K p``, ``m``) takes for the given sizes."""
    value = sp.sympify(expr).xreplace({sp.Symbol(k, positive=True, integer=True): sp.Integer(v) for k, v in sizes.items()})
    if not value.is_Integer:
        raise ValueError(f"the size {expr} is not fixed by {sorted(sizes)}")
    return int(value)
