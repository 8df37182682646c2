"""Exact (unrelaxed) coding-rate steps at any token count: the optimised lowering solves
``X (I_N + c XᵀX)⁻¹`` on its smaller side through the push-through identity
``X (I_N + c XᵀX)⁻¹ = (I_r + c X Xᵀ)⁻¹ X``, and the measured log-determinants use Sylvester's
``det(I_N + a XᵀX) = det(I_r + a X Xᵀ)``. Every result is compared, in float64, with the plain
lowering (which inverts the N x N matrix as printed) or with torch.linalg on the N x N matrix."""

import pytest
import sympy as sp
import torch

import unroll
from unroll.lower.interpret import Lowering
from unroll.lower.optimize import OptimizedLowering, _PushThrough, _push_throughs, gram_solve
from unroll.objective import CodingRate, Compression

WIDTH, HEADS = 32, 4  # p = 8
P = WIDTH // HEADS
TOL = 1e-10

OBJECTIVES = {
    "compression": lambda: Compression(eps=0.5),
    "coding_rate_descent": lambda: CodingRate(eps=0.5),
    "coding_rate_ascent": lambda: -CodingRate(eps=0.5),
}
# the side the optimised step factors: r = p for compression, r = d for the coding rate
ROWS = {"compression": P, "coding_rate_descent": WIDTH, "coding_rate_ascent": WIDTH}


def builds(objective):
    """(optimised, plain) float64 models of one exact gradient step with the same weights."""
    step = unroll.GradientStep(objective, step_size=0.1, name="s")
    net = unroll.Network((step,), width=WIDTH, heads=HEADS, depth=1,
                         frontend=unroll.PatchFrontend(image_size=16, patch_size=4, channels=1),
                         head=unroll.ClassifierHead(classes=3))
    fast = unroll.build(net, optimize=True).double()
    plain = unroll.build(net, optimize=False).double()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def spy_cholesky(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the matrices factored by ``torch.linalg.cholesky_ex`` from now on."""
    shapes, real = [], torch.linalg.cholesky_ex

    def spy(A, *args, **kwargs):
        shapes.append(tuple(A.shape))
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    return shapes


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("tokens", [4, 8, 20, 50])
def test_optimised_exact_step_equals_the_n_by_n_form(name, tokens, monkeypatch):
    fast, plain = builds(OBJECTIVES[name]())
    Z = torch.randn(3, WIDTH, tokens, dtype=torch.float64)
    with torch.no_grad():
        expected = plain.layer(0)(Z)
        factored = spy_cholesky(monkeypatch)
        got = fast.layer(0)(Z)
    assert (got - expected).abs().max() <= TOL
    # the step moved Z by far more than the tolerance, so the comparison means something
    assert (expected - Z).abs().max() > 1e3 * TOL
    # one Cholesky factorisation per call, of the smaller side (per head for compression)
    side = min(tokens, ROWS[name])
    assert [s[-2:] for s in factored] == [(side, side)]
    assert factored[0][:2] == ((3, HEADS) if name == "compression" else (3, 1))


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("tokens", [5, 50])
def test_gradients_through_the_optimised_step_equal_the_plain_ones(name, tokens):
    fast, plain = builds(OBJECTIVES[name]())
    Z = torch.randn(2, WIDTH, tokens, dtype=torch.float64)
    target = torch.randn(2, WIDTH, tokens, dtype=torch.float64)
    grads = []
    for model in (fast, plain):
        z = Z.clone().requires_grad_()
        ((model.layer(0)(z) - target) ** 2).sum().backward()
        params = {n: p.grad.clone() for n, p in model.layer(0).named_parameters()}
        grads.append((z.grad, params))
    (gz_fast, gp_fast), (gz_plain, gp_plain) = grads
    assert (gz_fast - gz_plain).abs().max() <= 1e-9 * gz_plain.abs().max()
    assert set(gp_fast) == set(gp_plain)
    for n, g in gp_plain.items():
        assert (gp_fast[n] - g).abs().max() <= 1e-9 * g.abs().max(), n


@pytest.mark.parametrize("tokens, rows", [(3, 5), (6, 2), (4, 4)])
def test_gram_solve_passes_gradcheck(tokens, rows):
    H = torch.randn(2, 1, tokens, rows, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram_solve, (H, c))


@pytest.mark.parametrize("tokens", [3, 9])
def test_gram_solve_batched_per_head_and_per_sample(tokens):
    """H = Xᵀ of shape (B, K, N, r), and a per-head value (1, K, N, r) broadcast against it."""
    for shape in [(2, 3, tokens, 6), (1, 3, tokens, 6)]:
        H = torch.randn(shape, dtype=torch.float64)
        c = 0.3
        eye = torch.eye(tokens, dtype=torch.float64)
        # X (I_N + c XᵀX)⁻¹ with X = Hᵀ, formed directly and transposed back
        X = H.mT
        expected = (X @ torch.linalg.inv(eye + c * X.mT @ X)).mT
        got = gram_solve(H, c)
        assert got.shape == H.shape
        assert (got - expected).abs().max() <= TOL


def test_gram_solve_factors_in_float32_under_bf16_and_autocast():
    H = torch.randn(2, 4, 40, 8)
    reference = gram_solve(H.double(), 0.5)
    half = gram_solve(H.bfloat16(), 0.5)
    assert half.dtype == torch.bfloat16
    assert (half.double() - reference).abs().max() <= 2e-2 * reference.abs().max()
    # autocast must not push the products inside down to bf16: the same float32 result as without
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gram_solve(H, 0.5)
    assert under.dtype == torch.float32
    assert torch.equal(under, gram_solve(H, 0.5))


def test_optimised_lowering_never_inverts_explicitly(monkeypatch):
    fast, _ = builds(Compression(eps=0.5))

    def refuse(*args, **kwargs):
        raise AssertionError("explicit inverse in the optimised lowering")

    monkeypatch.setattr(torch.linalg, "inv", refuse)
    with torch.no_grad():
        fast.layer(0)(torch.randn(1, WIDTH, 30, dtype=torch.float64))


def test_a_product_factor_is_pushed_through_and_an_unsigned_scale_is_not():
    """``Uᵀ Z (I + c Zᵀ U Uᵀ Z)⁻¹`` with ``A = Uᵀ Z`` unbound is recognised as a pair of factors;
    with c of unknown sign ``I + c AᵀA`` may not be positive definite, so it is left alone."""
    d, r, n = sp.Symbol("d", positive=True, integer=True), sp.Symbol("r", positive=True, integer=True), sp.Symbol("N", positive=True, integer=True)
    U, Z = sp.MatrixSymbol("U", d, r), sp.MatrixSymbol("Z", d, n)
    c = sp.Symbol("c", positive=True)
    expr = sp.MatMul(U.T, Z, sp.Inverse(sp.Identity(n) + c * Z.T * U * U.T * Z))
    found = _push_throughs(list(expr.args))
    assert len(found) == 1 and isinstance(found[0], _PushThrough) and found[0].arg == U.T * Z
    unsigned = sp.Symbol("s")
    assert _push_throughs([Z, sp.Inverse(sp.Identity(n) + unsigned * Z.T * Z)])[0] == Z

    sizes = {"d": 12, "r": 5}
    for tokens in (3, 20):
        Zv = torch.randn(2, 1, 12, tokens, dtype=torch.float64)
        Uv = torch.randn(1, 1, 12, 5, dtype=torch.float64)
        plain_env = {"Z": Zv, "U": Uv, "c": 0.2, "__sizes__": {**sizes, "N": tokens}}
        rows_env = {"Z": Zv.mT, "U": Uv.mT, "c": 0.2, "__sizes__": {**sizes, "N": tokens}}
        expected = Lowering().matrix(expr)(plain_env)
        got = OptimizedLowering({}, sizes).matrix(expr)(rows_env).mT
        assert (got - expected).abs().max() <= TOL


def test_compiles_whole_on_both_sides_of_the_switch():
    fast, _ = builds(Compression(eps=0.5))
    layer = fast.layer(0).float()

    def backend(gm, example_inputs):
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in (4, 6, 40, 60):
            Z = torch.randn(2, WIDTH, tokens)
            assert (compiled(Z) - layer(Z)).abs().max() <= 1e-5


def _direct_logdet(X: torch.Tensor, a: float) -> torch.Tensor:
    n = X.shape[-1]
    return torch.logdet(torch.eye(n, dtype=X.dtype) + a * X.mT @ X)


@pytest.mark.parametrize("tokens", [6, 20, 80])  # below p, between p and d, above d
def test_logdet_values_equal_the_n_by_n_determinant(tokens):
    Z = torch.randn(3, WIDTH, tokens, dtype=torch.float64)
    eps = 0.5
    rate = CodingRate(eps=eps).value(Z, {})
    assert (rate - 0.5 * _direct_logdet(Z, WIDTH / (tokens * eps**2))).abs().max() <= TOL
    U = torch.randn(HEADS, WIDTH, P, dtype=torch.float64)
    compression = Compression(eps=eps).value(Z, {"U": U})
    W = U.mT.unsqueeze(0) @ Z.unsqueeze(1)  # (B, K, p, N)
    expected = 0.5 * _direct_logdet(W, P / (tokens * eps**2)).sum(-1)
    assert (compression - expected).abs().max() <= TOL
    assert rate.shape == compression.shape == (3,)
