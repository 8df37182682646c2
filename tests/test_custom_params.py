"""Custom terms with learned parameters: per layer, counted, saved, trained, explained."""

import pytest
import torch

import unroll
from unroll.checkpoint import load_weights, save_weights
from unroll.measure import measure
from unroll.objective import CodingRate, Compression, Custom, Param
from unroll.relax import CompleteSubspaces, Neumann, Residual, SoftmaxSimilarity, UntieOutput

FRONT = dict(frontend=unroll.PatchFrontend(image_size=8, patch_size=4), head=unroll.ClassifierHead(classes=3))


def quadratic(X, W):
    """½ ‖X W‖² / N for one sample's tokens X (N, d)."""
    return 0.5 * ((X @ W) ** 2).sum() / X.shape[0]


def network(depth=3, tie=False, term=None):
    term = term or Custom("energy", quadratic, params=(Param("W", ("d", "d"), init="uniform"),))
    step = unroll.GradientStep(Compression(eps=0.5) + 0.1 * term, step_size=0.1, name="reduce")
    return unroll.Network((step,), width=16, heads=2, depth=depth, tie_layers=tie, **FRONT)


@pytest.mark.parametrize("tie", [False, True])
def test_a_declared_parameter_exists_once_per_untied_layer(tie):
    model = unroll.build(network(tie=tie))
    names = [n for n, _ in model.named_parameters() if n.endswith(".W")]
    assert names == (["encoder.layers.0.steps.reduce.W"] if tie else
                     [f"encoder.layers.{i}.steps.reduce.W" for i in range(3)])
    assert all(p.shape == (16, 16) for n, p in model.named_parameters() if n.endswith(".W"))
    bound = 1 / 16**0.5  # uniform init, fan-in d
    W = model.layer(0).steps["reduce"].W
    assert W.abs().max() <= bound and W.std() > 0.2 * bound


def test_the_lowered_step_uses_the_parameter_as_the_hand_written_gradient(tmp_path):
    model = unroll.build(network(depth=1), optimize=False).double()
    step = model.layer(0).steps["reduce"]
    Z = torch.randn(2, 16, 5, dtype=torch.float64)
    with torch.no_grad():
        step.W.copy_(torch.randn(16, 16))
        only_energy = Z - 0.1 * 0.1 * (step.W @ step.W.mT @ Z) / 5  # ∇ ½‖Zᵀ W‖²/N = W Wᵀ Z / N
        U = step.U
        W_k = U.mT @ Z.unsqueeze(1)  # (B, K, p, N)
        beta = 8 / (5 * 0.25)
        gram = torch.eye(5, dtype=torch.float64) + beta * W_k.mT @ W_k
        compression = beta * (U @ W_k @ torch.linalg.inv(gram)).sum(1)
        assert torch.allclose(step(Z), only_energy - 0.1 * compression, atol=1e-12)


def test_gradients_reach_the_parameter_and_it_round_trips_through_safetensors(tmp_path):
    for optimize in (True, False):
        model = unroll.build(network(), optimize=optimize)
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).sum()
        loss.backward()
        grads = [model.layer(i).steps["reduce"].W.grad for i in range(3)]
        assert all(g is not None and g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads)
    save_weights(model.state_dict(), tmp_path / "w.safetensors")
    again = unroll.build(network())
    load_weights(again, tmp_path / "w.safetensors")
    for i in range(3):
        assert torch.equal(again.layer(i).steps["reduce"].W, model.layer(i).steps["reduce"].W)


def test_explain_lists_the_parameter_and_the_gradient_names_it():
    text = unroll.explain(network())
    assert "∇energy(Z; W)" in text
    assert "W: 16 x 16, a parameter of the custom term energy" in text


def test_per_head_parameters_follow_the_naming_rule():
    def per_head(X, V_k):  # (N, d) and (K, d, p)
        return ((X @ V_k) ** 2).sum() / X.shape[0]

    term = Custom("heads", per_head, params=(Param("V_k", ("d", "p"), init="kaiming"),))
    model = unroll.build(network(depth=2, term=term))
    assert model.layer(0).steps["reduce"].V.shape == (2, 16, 8)
    assert "V_k (stored as V): 2 x 16 x 8" in unroll.explain(network(depth=2, term=term))
    rows = measure(model.eval(), torch.randn(2, 3, 8, 8))
    assert all("reduce: heads" in row and row["reduce: heads"] > 0 for row in rows)


def test_vector_and_numeric_shapes():
    term = Custom("shift", lambda X, c, M: ((X - c) @ M).pow(2).sum(), params=(Param("c", ("d",), "zeros"), Param("M", ("d", 3), "ones")))
    model = unroll.build(network(depth=1, term=term))
    step = model.layer(0).steps["reduce"]
    assert step.c.shape == (16,) and torch.equal(step.c, torch.zeros(16))
    assert step.M.shape == (16, 3) and torch.equal(step.M, torch.ones(16, 3))


@pytest.mark.parametrize("make, message", [
    (lambda: Custom("bad", lambda X: X.sum(0)), "fn must return one scalar per sample .* found shape \\(16,\\)"),
    (lambda: Custom("bad", lambda X: X.sum(0).tolist()), "fn must return one scalar per sample .* found list"),
    (lambda: Custom("bad", lambda X, W: (X @ W).sum(), params=(Param("W", ("p", "d")),)), "fn failed on one sample's tokens"),
    (lambda: Custom("clash", lambda X, b: (X @ b).sum(), params=(Param("b", ("d",)),)),
     "two different parameters are named b: a parameter of the custom term clash .* and output bias"),
    (lambda: Custom("clash", lambda X, U_k: (X @ U_k).sum(), params=(Param("U_k", ("d", "d")),)),
     "two different parameters are named U_k"),
    (lambda: Custom("clash", lambda X, rows: (X @ rows).sum(), params=(Param("rows", ("d",)),)),
     "'rows' is taken by the lowered step"),
    (lambda: Custom("clash", lambda X, beta: (X @ beta).sum(), params=(Param("beta", ("d",)),)),
     "beta names both a parameter and a constant or intermediate result"),
    (lambda: Custom("clash", lambda X, training: (X @ training).sum(), params=(Param("training", ("d",)),)),
     "'training' is taken by the lowered step"),
])
def test_mistakes_in_a_custom_term_are_named(make, message):
    relax = (Neumann(), CompleteSubspaces(), SoftmaxSimilarity(), UntieOutput(), Residual())
    term = make()
    step = unroll.GradientStep(Compression() + term, name="reduce", relax=relax if term.name == "clash" and
                               term.params[0].name == "b" else ())
    net = unroll.Network((step,), width=16, heads=2, depth=1, **FRONT)
    for stage in (unroll.build, unroll.explain):
        with pytest.raises(unroll.UnrollError, match=message):
            stage(net)


@pytest.mark.parametrize("make, message", [
    (lambda: Param("W", ("d", "N")), "the token count N varies"),
    (lambda: Param("W", ("d", "d", "d")), "one or two entries"),
    (lambda: Param("_W", ("d",)), "identifier not starting with _"),
    (lambda: Param("W", ("d",), init="normal"), "init must be one of uniform, kaiming, zeros, ones"),
    (lambda: Custom("f", None), "fn must be a function"),
    (lambda: Custom("f", quadratic, params=(("W", ("d", "d")),)), "params must be unroll.objective.Param"),
    (lambda: Custom("f", quadratic, params=(Param("W", ("d",)), Param("W", ("d",)))), "names must be unique"),
])
def test_mistakes_in_declaring_parameters_are_named(make, message):
    with pytest.raises(unroll.UnrollError, match=message):
        make()


def test_signed_objectives_print_with_their_signs():
    energy = Custom("f", lambda X: (X**2).sum())
    step = unroll.GradientStep(-CodingRate() + energy, name="expand")
    text = unroll.explain(unroll.Network((step,), width=16, heads=2, depth=1, **FRONT))
    assert "step 1 · expand · gradient descent on -R + f" in text
    assert "objective (minimised): -R + f" in text
    both = unroll.Network((unroll.GradientStep(Compression() - CodingRate(), name="reduce"),
                           unroll.GradientStep(-CodingRate(), name="expand")), width=16, heads=2, depth=1, **FRONT)
    text = unroll.explain(both)
    assert "objective (minimised): R^c - R - R" in text
    assert "gradient descent on R^c - R" in text and "step 2 · expand · gradient ascent on R" in text
    assert "+ -" not in text


def test_constants_the_relaxations_remove_are_reported(capsys, tmp_path):
    from unroll.cli import main

    text = unroll.explain(unroll.as_network("recipes/crate_tiny.yaml"))
    assert "note: ε = 0.5 (a setting of the term R^c) has no effect on the computed update" in text
    assert "note: κ = 1 (the step size, step_size) has no effect" in text
    change = ["--set", "objective.Rc.eps=0.25"]
    assert main(["explain", "recipes/crate_digits.yaml", *change]) == 0
    assert "ε = 0.25 (a setting of the term R^c) has no effect" in capsys.readouterr().out
    assert main(["build", "recipes/crate_digits.yaml", *change, "--out", str(tmp_path)]) == 0
    assert "step compress: ε = 0.25 (a setting of the term R^c) has no effect" in capsys.readouterr().err


def test_a_seeded_build_is_reproducible_and_the_probe_meets_float32_closures():
    """Planning calls fn once on fixed values in the default dtype: no random draw, no float64."""
    W = torch.randn(16, 16)  # float32, captured
    term = Custom("closure", lambda X: ((X @ W) ** 2).sum())
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        net = network(depth=1, term=Custom("closure", lambda X: ((X @ W) ** 2).sum()))  # a new plan each time
        states.append(unroll.build(net).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert unroll.build(network(depth=1, term=term)) is not None


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("unroll.objective", fromlist=["L1"]).L1(lam="0.1"), "term l1: lam: Input should be a valid number"),
    (lambda: __import__("unroll.objective", fromlist=["GroupSparsity"]).GroupSparsity(group=4.0),
     "group: Input should be a valid integer"),
    (lambda: unroll.ProximalStep(Compression(), iterations="2"), "iterations: Input should be a valid integer"),
    (lambda: unroll.ProximalStep(Compression(), warm_start="bogus"), "warm_start: Input should be 'input' or 'zero'"),
    (lambda: unroll.Network((unroll.GradientStep(Compression()),), width=16, heads=2, depth=1, head="x"),
     "head must be a ClassifierHead or a LanguageHead, found str"),
    (lambda: unroll.Network((unroll.GradientStep(Compression()),), width=16, heads=2, depth=1, tie_layers="yes"),
     "tie_layers: Input should be a valid boolean"),
])
def test_values_of_the_wrong_kind_are_refused_where_they_are_given(make, message):
    with pytest.raises(unroll.UnrollError, match=message):
        make()


def test_an_int_given_for_a_float_is_stored_as_a_float():
    from unroll.objective import L1

    assert type(L1(lam=1).lam) is float
