"""Every derived gradient against autograd, every proximal operator against its optimality
condition, and exact steps against the objective they descend (float64)."""

import numpy as np
import pytest
import sympy as sp
import torch

from unroll.derive import GradientStep, ProximalStep, derive
from unroll.derive.steps import prox_of
from unroll.expr.numeric import evaluate
from unroll.expr.symbols import N, Z
from unroll.expr.symbols import m as atoms
from unroll.lower.step import LoweredStep
from unroll.objective import L1, CodingRate, Compression, Custom, Lasso, NonNegative
from unroll.objective.base import Weighted

SHAPES = [(8, 5, 2), (12, 7, 3), (6, 16, 1)]  # (d, N, K)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def autograd(fn, x: torch.Tensor) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g.numpy()


@pytest.mark.parametrize("d,n,k", SHAPES)
def test_coding_rate_gradient(d, n, k):
    term = CodingRate(eps=0.7)
    X = torch.randn(1, d, n, dtype=torch.float64)
    g = term.gradient(Z)
    derived = evaluate(g.expr, {"Z": X[0].numpy(), "epsilon": 0.7}, g.where)
    assert rel_err(derived, autograd(lambda z: term.value(z, {}), X)[0]) < 1e-8


@pytest.mark.parametrize("d,n,k", SHAPES)
def test_compression_gradient(d, n, k):
    term = Compression(eps=0.3)
    X = torch.randn(1, d, n, dtype=torch.float64)
    U = torch.randn(k, d, d // k, dtype=torch.float64)
    g = term.gradient(Z)
    derived = evaluate(g.expr, {"Z": X[0].numpy(), "U_k": U.numpy(), "epsilon": 0.3}, g.where)
    assert rel_err(derived, autograd(lambda z: term.value(z, {"U": U}), X)[0]) < 1e-8


@pytest.mark.parametrize("d,n,expansion", [(8, 5, 1), (6, 9, 4)])
def test_lasso_gradient_in_the_code(d, n, expansion):
    term = Lasso(expansion=expansion)
    m = expansion * d
    D = torch.randn(d, m, dtype=torch.float64)
    data = torch.randn(1, d, n, dtype=torch.float64)
    A = torch.randn(1, m, n, dtype=torch.float64)
    g = term.gradient(sp.MatrixSymbol("A", atoms, N), Z)
    derived = evaluate(g.expr, {"A": A[0].numpy(), "Z": data[0].numpy(), "D": D.numpy()})
    expected = autograd(lambda a: term.value(a, {"D": D}, data), A)[0]
    assert rel_err(derived, expected) < 1e-8


def test_custom_term_gradient_is_autograd_of_its_function():
    term = Custom("quartic", lambda x: (x**4).sum() / 4 + x.sum() * x[0, 0])
    X = torch.randn(3, 6, 5, dtype=torch.float64)
    step = LoweredStep(derive(GradientStep(term, step_size=1.0)), {"d": 6, "p": 3, "K": 2}, [])
    lowered_grad = (X - step(X)).numpy()  # Z - (Z - grad) with kappa = 1
    assert rel_err(lowered_grad, autograd(lambda z: term.value(z, {}), X)) < 1e-8


PROXES = {
    "l1": [Weighted(sp.Integer(1), L1(lam=0.3))],
    "nonneg": [Weighted(sp.Integer(1), NonNegative())],
    "l1+nonneg": [Weighted(sp.Integer(1), L1(lam=0.3)), Weighted(sp.Integer(1), NonNegative())],
}


@pytest.mark.parametrize("name", PROXES)
def test_proximal_operator_optimality(name):
    """x = prox_{t g}(v) iff 0 in x - v + t dg(x), checked entrywise; and x beats perturbations."""
    parts, t = PROXES[name], 0.5
    V = sp.MatrixSymbol("V", 7, 9)
    v = np.random.randn(7, 9) * 0.6
    x = evaluate(prox_of(parts, V, sp.Float(t)), {"V": v, "eta": t, "lambda": 0.3})
    has_l1, has_nonneg = "l1" in name, "nonneg" in name
    thr = t * 0.3 if has_l1 else 0.0
    active = x != 0
    # stationarity where x is non-zero: x - v + t lambda sign(x) = 0
    assert np.allclose((x - v + thr * np.sign(x))[active], 0, atol=1e-12)
    # at zero: the subdifferential contains v
    lo = -np.inf if has_nonneg else -thr
    assert np.all((v[~active] <= thr + 1e-12) & (v[~active] >= lo - 1e-12))
    if has_nonneg:
        assert np.all(x >= 0)

    def F(y):
        g = 0.3 * np.abs(y).sum() if has_l1 else 0.0
        if has_nonneg and np.any(y < 0):
            return np.inf
        return t * g + 0.5 * ((y - v) ** 2).sum()

    for _ in range(50):
        assert F(x) <= F(x + 1e-3 * np.random.randn(*x.shape)) + 1e-15


def test_exact_compression_step_decreases_compression():
    term = Compression(eps=0.5)
    step = LoweredStep(derive(GradientStep(term, step_size=0.05)), {"d": 8, "p": 4, "K": 2}, ["beta", "W_k"]).double()
    X = torch.randn(4, 8, 10, dtype=torch.float64)
    U = step.U.detach()
    before, after = term.value(X, {"U": U}), term.value(step(X).detach(), {"U": U})
    assert torch.all(after < before)


def test_exact_sparsification_step_decreases_lasso_objective():
    lam = 0.1
    step = LoweredStep(
        derive(ProximalStep(Lasso() + L1(lam=lam) + NonNegative(), step_size=0.1)), {"d": 8, "p": 4, "K": 2}, []
    ).double()
    with torch.no_grad():
        step.D.copy_(torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0] * 1.5)  # eta ||D||^2 < 1
    X = torch.randn(4, 8, 10, dtype=torch.float64).abs()  # the warm start A = Z is feasible

    def F(A):
        return Lasso().value(A, {"D": step.D.detach()}, X) + L1(lam=lam).value(A, {})

    A1 = step(X).detach()
    assert torch.all(A1 >= 0)
    assert torch.all(F(A1) < F(X))
