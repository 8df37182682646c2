"""The GPT baseline of the language-model comparison: its exact size, its causality, its tied head,
that it trains, and that it refuses sequences longer than its context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unroll.train.baseline import BaselineLM, baseline_parameters

VOCAB, CONTEXT, WIDTH, DEPTH, HEADS = 97, 16, 32, 2, 4


def small(causal: bool = True, seed: int = 0) -> BaselineLM:
    torch.manual_seed(seed)
    return BaselineLM(VOCAB, CONTEXT, WIDTH, DEPTH, HEADS, causal=causal)


def test_parameter_count_matches_formula_and_hand_count() -> None:
    model = small()
    counted = sum(p.numel() for p in model.parameters())
    # By hand, d = 32: wte 97*32 = 3104; wpe 16*32 = 512;
    # a block 12*32*32 + 13*32 = 12288 + 416 = 12704, two of them 25408; ln_f 2*32 = 64.
    by_hand = 3104 + 512 + 25408 + 64
    assert by_hand == 29088
    assert counted == by_hand
    assert baseline_parameters(VOCAB, CONTEXT, WIDTH, DEPTH) == by_hand
    # The formula must hold away from the one size checked by hand (other depth, width, heads).
    other = BaselineLM(50, 8, 48, 3, 6)
    assert sum(p.numel() for p in other.parameters()) == baseline_parameters(50, 8, 48, 3)


def _logits_with_token_changed(model: BaselineLM, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, CONTEXT))
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
    return model(ids), model(changed)


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_causal_model_does_not_see_the_future(train_mode: bool) -> None:
    # Eval mode under no_grad takes nn.TransformerEncoderLayer's fused fast path, which handles
    # the mask separately from the training path; both must be causal.
    model = small(causal=True).train(train_mode)
    t = 7
    with torch.no_grad():
        before, after = _logits_with_token_changed(model, t)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    # The change is seen from t+1 on, so the comparison above is not vacuous.
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_bidirectional_model_sees_the_next_token(train_mode: bool) -> None:
    model = small(causal=False).train(train_mode)
    t = 7
    with torch.no_grad():
        before, after = _logits_with_token_changed(model, t)
    assert not torch.allclose(before[:, t], after[:, t])
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_head_is_tied_to_token_embedding() -> None:
    model = small()
    vocab_sized = [name for name, p in model.named_parameters() if VOCAB in p.shape]
    assert vocab_sized == ["wte.weight"]
    state = model.state_dict()
    assert [k for k, v in state.items() if VOCAB in v.shape] == ["wte.weight"]
    assert not any("head" in k or "lm_" in k for k in state)
    # The head's gradient lands on wte, so there is no other tensor for it to go to.
    ids = torch.randint(0, VOCAB, (1, 4))
    logits = model(ids)
    logits.sum().backward()
    assert model.wte.weight.grad is not None


def test_embeddings_start_gpt2_small() -> None:
    model = small()
    for weight in (model.wte.weight, model.wpe.weight):
        assert abs(weight.std().item() - 0.02) < 0.005


def test_training_drives_loss_down() -> None:
    model = small()
    # A repeated short pattern: a model whose gradients reach every part learns it in a few steps.
    ids = torch.arange(8).repeat(2).unsqueeze(0) % VOCAB  # (1, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])  # (1, 15, vocab)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # A fresh model is near uniform over the vocabulary.
    assert abs(losses[0] - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    assert losses[-1] < 0.5 * losses[0]


def test_every_parameter_gets_a_gradient() -> None:
    model = small()
    ids = torch.randint(0, VOCAB, (2, CONTEXT))
    model(ids).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_sequence_longer_than_context_raises() -> None:
    model = small()
    with pytest.raises(ValueError, match="context of 16"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))
    # Exactly the context is fine.
    assert model(torch.zeros(1, CONTEXT, dtype=torch.long)).shape == (1, CONTEXT, VOCAB)
