"""From update expressions to torch modules: a generic lowering of the sympy tree."""
