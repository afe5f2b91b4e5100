"""Mechanics of the objective: loss identities, pooling, targets, metrics, Fano bound."""

import math

import pytest
import torch

from mi_tune.losses import bag_of_tokens, next_token_loss, recoverability_loss
from mi_tune.metrics import bag_cosine, binary_entropy_bits, fano_uniform_estimate_bits, recoverability_accuracy, unigram_entropy_bits
from mi_tune.pooling import pool


def test_bag_excludes_special_and_pad():
    ids = torch.tensor([[1, 5, 7, 5, 2, 3, 3], [1, 9, 2, 3, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    y = bag_of_tokens(ids, mask, vocab_size=12, exclude_ids=torch.tensor([1, 2, 3]))
    assert y[0].nonzero().flatten().tolist() == [5, 7]
    assert y[1].nonzero().flatten().tolist() == [9]
    # a pad id that is also a real token elsewhere is excluded only through the mask, not silently counted
    y2 = bag_of_tokens(torch.tensor([[4, 6, 6]]), torch.tensor([[1, 1, 0]]), vocab_size=8)
    assert y2[0].nonzero().flatten().tolist() == [4, 6]


def test_loss_identities():
    y = torch.zeros(2, 10)
    y[0, [1, 3]] = 1
    y[1, [4]] = 1
    perfect = (y * 2 - 1) * 50.0  # confident and right
    assert recoverability_loss(perfect, y).item() < 1e-12
    zero = torch.zeros(2, 10)  # p = 0.5 everywhere: each of V terms costs log 2, divided by |bag|
    expected = ((10 * math.log(2) / 2) + (10 * math.log(2) / 1)) / 2
    assert recoverability_loss(zero, y).item() == pytest.approx(expected, rel=1e-6)
    # positive weight w multiplies only the positive terms
    w = 3.0
    pos_terms = (y * math.log(2)).sum(1)
    neg_terms = ((1 - y) * math.log(2)).sum(1)
    expected_w = ((w * pos_terms + neg_terms) / y.sum(1)).mean()
    assert recoverability_loss(zero, y, positive_weight=w).item() == pytest.approx(expected_w.item(), rel=1e-6)


def test_next_token_loss_ignores_pad():
    V = 6
    ids = torch.tensor([[0, 1, 2, 5]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.full((1, 4, V), -20.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 20.0  # predicts the real next tokens; position 2 -> pad is ignored
    assert next_token_loss(logits, ids, mask).item() < 1e-6


@pytest.mark.parametrize("method", ["mean", "last", "first", "max", "weighted_mean"])
def test_pooling_same_under_left_and_right_padding(method):
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4)
    lengths = [3, 2]
    right = torch.zeros(2, 5, 4)
    left = torch.zeros(2, 5, 4)
    mr = torch.zeros(2, 5, dtype=torch.long)
    ml = torch.zeros(2, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        right[i, :n], mr[i, :n] = h[i, :n], 1
        left[i, 5 - n:], ml[i, 5 - n:] = h[i, :n], 1
        right[i, n:] = 99.0  # garbage in pad positions must not leak
        left[i, : 5 - n] = 99.0
    a, b = pool(right, mr, method), pool(left, ml, method)
    torch.testing.assert_close(a, b)
    if method == "last":
        torch.testing.assert_close(a[1], h[1, 1])
    if method == "mean":
        torch.testing.assert_close(a[1], h[1, :2].mean(0))


def test_recoverability_accuracy_is_precision_at_bag_size():
    y = torch.zeros(2, 6)
    y[0, [0, 1]] = 1  # k = 2
    y[1, [2, 3, 4]] = 1  # k = 3
    s = torch.tensor([[5.0, 0.0, 4.0, 0, 0, 0],  # top-2 = {0, 2}: one hit -> 0.5
                      [0, 0, 3.0, 2.0, 1.0, 0]])  # top-3 = {2, 3, 4}: 1.0
    torch.testing.assert_close(recoverability_accuracy(s, y), torch.tensor([0.5, 1.0]))
    empty = recoverability_accuracy(torch.zeros(1, 6), torch.zeros(1, 6))
    assert torch.isnan(empty).all()


def test_bag_cosine():
    y = torch.tensor([[1.0, 0, 1, 0]])
    assert bag_cosine(y.clone(), y).item() == pytest.approx(1.0)
    assert bag_cosine(torch.tensor([[0, 1.0, 0, 1]]), y).item() == pytest.approx(0.0)


def test_papers_estimate_hand_values_and_edges():
    V = 1024
    assert fano_uniform_estimate_bits(1.0, V) == pytest.approx(10.0)  # Pe = 0: log2 |V| = 10 "bits"
    assert fano_uniform_estimate_bits(1.0 / V, V) == pytest.approx(0.0, abs=1e-9)  # chance: 0
    hb = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert binary_entropy_bits(0.25) == pytest.approx(hb)
    assert fano_uniform_estimate_bits(0.75, V) == pytest.approx(10 - hb - 0.25 * math.log2(1023))
    assert fano_uniform_estimate_bits(0.0, V) == pytest.approx(10 - math.log2(1023))


def test_unigram_entropy():
    assert unigram_entropy_bits(torch.tensor([1, 1, 1, 1, 0])) == pytest.approx(2.0)
    assert unigram_entropy_bits(torch.tensor([5, 0, 0])) == pytest.approx(0.0)


# ---- the head with corpus columns (a column per training token + one shared column) ----------------


def _heads(V=300, D=12, active=(3, 7, 8, 42, 120, 299), seed=0):
    from mi_tune.head import HeadConfig, RecoverabilityHead

    cfg = HeadConfig("x", 1, "mean", D, V, 3, init="prior")
    full, compact = RecoverabilityHead(cfg), RecoverabilityHead(cfg, active_ids=list(active))
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    inactive = torch.ones(V, dtype=torch.bool)
    inactive[list(active)] = False
    W[inactive], b[inactive] = W[inactive][0], b[inactive][0]  # every never-seen token starts from one column (as every init does)
    full.load_full_weights(W, b)
    compact.load_full_weights(W, b)
    return full, compact, torch.tensor(active)


def test_corpus_columns_give_the_full_heads_logits_and_saved_file(tmp_path):
    from mi_tune.head import RecoverabilityHead

    full, compact, _ = _heads()
    assert compact.decoder.weight.shape == (7, 12)
    x = torch.randn(5, 12)
    assert torch.allclose(full(x), compact(x), atol=1e-6)  # (different GEMM shapes: last-bit float differences)
    compact.save(tmp_path / "h")
    back = RecoverabilityHead.from_pretrained(tmp_path / "h")  # the file is full-vocabulary: any reader loads it
    assert back.decoder.weight.shape == (300, 12) and torch.allclose(back(x), full(x), atol=1e-6)


def test_corpus_columns_train_exactly_like_the_full_head():
    """AdamW + gradient clipping, targets only among the active tokens (as in training): same weights after 5 steps."""
    full, compact, active = _heads()
    emb = torch.randn(6, 12, requires_grad=True)
    opts = [torch.optim.AdamW(h.parameters(), lr=1e-2, weight_decay=0.01) for h in (full, compact)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        y = torch.zeros(6, 300)
        y[:, active] = (torch.rand(6, len(active), generator=g) > 0.5).float()
        grads = []
        for h, opt in zip((full, compact), opts):
            emb.grad = None
            recoverability_loss(h(emb), y).backward()
            grads.append(emb.grad.clone())
            norm = torch.nn.utils.clip_grad_norm_(h.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        assert torch.allclose(grads[0], grads[1], atol=1e-5)  # the backbone receives the same gradient
    fw, fb = compact.full_weights()
    assert torch.allclose(fw, full.decoder.weight, atol=1e-5) and torch.allclose(fb, full.decoder.bias, atol=1e-5)
    assert norm > 0
