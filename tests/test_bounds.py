"""Information quantities against joint distributions whose I(T;E) is known exactly: what is called a lower bound
stays below the truth; the paper's uniform-token estimate can exceed it. Plus the sample path the probe and the
held-out check use (decoder -> q(t|E) -> H(T) - CE) on synthetic bags with a known answer."""

import math

import numpy as np
import pytest
import torch

from mi_tune.decoders import BagSet, InformationProbe, fit_ridge, prior_per_sentence
from mi_tune.metrics import (bag_token_entropy_bits, binary_entropy_bits, entropy_bits, fano_list_lower_bound_bits,
                             fano_uniform_estimate_bits, information, variational_lower_bound_bits)
from mi_tune.stats import paired_mean_difference, stratified_mean_difference


def joint(seed: int, n_e: int = 6, V: int = 40, support: int = 12):
    """A random joint p(e, t): E uniform, T | E a random distribution on a random subset of the vocabulary."""
    g = np.random.default_rng(seed)
    p_t_e = np.zeros((n_e, V))
    for e in range(n_e):
        ids = g.choice(V, size=support, replace=False)
        p_t_e[e, ids] = g.dirichlet(np.full(support, 0.3))
    p_e = np.full(n_e, 1.0 / n_e)
    return p_e, p_t_e


def exact(p_e, p_t_e):
    p_t = p_e @ p_t_e
    h_t = entropy_bits(torch.tensor(p_t))
    h_t_e = float(sum(p_e[e] * entropy_bits(torch.tensor(p_t_e[e])) for e in range(len(p_e))))
    return h_t, h_t - h_t_e


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("k", [1, 3])
def test_list_fano_and_variational_stay_below_the_true_mutual_information(seed, k):
    p_e, p_t_e = joint(seed)
    V = p_t_e.shape[1]
    h_t, mi = exact(p_e, p_t_e)
    # the best list of k guesses given E (any other list is worse): its success probability
    acc = float(sum(p_e[e] * np.sort(p_t_e[e])[-k:].sum() for e in range(len(p_e))))
    assert fano_list_lower_bound_bits(acc, V, k, h_t) <= mi + 1e-9
    # q = the truth gives CE = H(T|E): the variational bound is exact; a blurred q gives less
    ce_true = float(sum(p_e[e] * -(p_t_e[e][p_t_e[e] > 0] * np.log2(p_t_e[e][p_t_e[e] > 0])).sum() for e in range(len(p_e))))
    assert variational_lower_bound_bits(h_t, ce_true) == pytest.approx(mi, abs=1e-9)
    q = 0.7 * p_t_e + 0.3 / V
    ce_blur = float(sum(p_e[e] * -(p_t_e[e] * np.log2(q[e])).sum() for e in range(len(p_e))))
    assert variational_lower_bound_bits(h_t, ce_blur) <= mi + 1e-9
    info = information(acc, ce_blur, h_t, V, k)
    assert info["mi_lb_bits"] == max(info["mi_variational_lb_bits"], info["mi_fano_list_lb_bits"]) <= mi + 1e-9


def test_the_papers_estimate_exceeds_the_truth_where_tokens_are_not_uniform():
    # T uniform on 2 of 1,024 ids and E = T: I(T;E) = 1 bit, a perfect decoder
    V, mi = 1024, 1.0
    assert fano_uniform_estimate_bits(1.0, V) == pytest.approx(10.0)  # the paper's formula: log2|V| = 10 bits
    assert fano_uniform_estimate_bits(1.0, V) > mi
    assert fano_list_lower_bound_bits(1.0, V, 1, token_entropy_bits=1.0) == pytest.approx(mi)  # the valid one is tight here
    # and a no-feature decoder that guesses the more frequent of two ids (accuracy 0.5) still gets "bits" from it
    assert fano_uniform_estimate_bits(0.5, V) > 4.0
    assert fano_list_lower_bound_bits(0.5, V, 1, token_entropy_bits=1.0) == 0.0


def test_list_fano_by_hand():
    # V = 1024, k = 4, Pe = 0.25, H(T) = 9: 9 - H_b(.25) - .25 log2(1020) - .75 log2(4)
    hb = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert binary_entropy_bits(0.25) == pytest.approx(hb)
    assert fano_list_lower_bound_bits(0.75, 1024, 4, 9.0) == pytest.approx(9 - hb - 0.25 * math.log2(1020) - 1.5)
    assert fano_list_lower_bound_bits(0.2, 1024, 4, 9.0) == 0.0  # vacuous at low accuracy: clipped


def test_bag_token_entropy_is_the_entropy_of_a_token_drawn_from_a_bag():
    Y = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])  # bags {0, 1} and {2}; the empty bag is skipped
    # T: sentence 1 or 2 (1/2 each), then a token of its bag: p = (1/4, 1/4, 1/2, 0)
    assert bag_token_entropy_bits(Y) == pytest.approx(1.5)


def synthetic_bags(n: int, seed: int, clusters: int = 8, per: int = 4, V: int = 64, noise: float = 0.3):
    """Each sentence: a cluster c (uniform), a bag of ONE token uniform among the cluster's 4 ids; E = one-hot(c) + noise.
    I(T;E) <= I(T;C) = log2(32) - log2(4) = 3 bits exactly (the noise can only lose information)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, clusters, (n,), generator=g)
    t = c * per + torch.randint(0, per, (n,), generator=g)
    Y = torch.zeros(n, V)
    Y[torch.arange(n), t] = 1.0
    X = torch.nn.functional.one_hot(c, clusters).float() + noise * torch.randn(n, clusters, generator=g)
    return X, Y


def test_the_probes_bound_on_samples_stays_below_the_truth_and_is_not_vacuous():
    X_tr, Y_tr = synthetic_bags(2000, 0)
    X_ev, Y_ev = synthetic_bags(3000, 1)
    dec = fit_ridge(X_tr[None], Y_tr, 1e-3)
    train = BagSet.of(Y_tr, dec.active)
    probe = InformationProbe(dec, 0, X_tr, train, linear=True)
    ev = BagSet.of(Y_ev, dec.active)
    r = probe.summary(probe.per_sentence(X_ev, ev), ev)
    assert r["token_entropy_bits"] == pytest.approx(5.0, abs=0.02)  # 32 equally likely ids
    assert 2.0 < r["mi_variational_lb_bits"] <= 3.0 + 0.03  # the truth is at most 3 bits; slack = sampling error only
    assert r["mi_lb_bits"] >= r["mi_variational_lb_bits"]
    assert r["mi_fano_uniform_bits"] == pytest.approx(fano_uniform_estimate_bits(r["recoverability_acc"], 64))
    # features that carry nothing: the bound is (clipped) zero
    X_noise = torch.randn_like(X_ev)
    r0 = probe.summary(probe.per_sentence(X_noise, ev), ev)
    assert r0["mi_variational_lb_bits"] < 0.35 and r0["recoverability_acc"] < 0.15
    # the prior: 1 of 32 ids, ranked by training frequency -> ~1/32 accuracy, and it is what `prior_acc` reports
    prior = prior_per_sentence(train.ya, ev, 64)
    assert float(prior.mean()) == pytest.approx(1 / 32, abs=0.02)


def test_paired_bootstrap_interval():
    g = np.random.default_rng(0)
    before = g.random(400)
    same = paired_mean_difference(before, before)
    assert same.estimate == 0 and same.low == 0 and same.high == 0 and not same.excludes_zero
    better = paired_mean_difference(before + 0.01, before)
    assert better.low == pytest.approx(0.01) and better.excludes_zero
    noisy = paired_mean_difference(before + g.normal(0, 0.1, 400), before)
    # the interval of a mean difference: about +-1.96 sd / sqrt(n)
    assert noisy.half_width == pytest.approx(1.96 * 0.1 / 20, rel=0.2)
    assert noisy.low < noisy.estimate < noisy.high
    # one set: the stratified interval is the paired one; two copies of a set: the same estimate
    assert stratified_mean_difference([before + 0.01], [before]) == better
    two = stratified_mean_difference([before + 0.01, before + 0.03], [before, before])
    assert two.estimate == pytest.approx(0.02) and two.excludes_zero
    with pytest.raises(ValueError, match="same items"):
        paired_mean_difference(before[:3], before[:4])


def test_ridge_leave_one_out_scores_equal_a_refit_without_the_sentence():
    from mi_tune.decoders import compact_bags, ridge_loo_scores

    g = torch.Generator().manual_seed(0)
    N, D, V = 60, 5, 12
    X = torch.randn(N, D, generator=g)
    Y = (torch.rand(N, V, generator=g) < 0.3).float()
    Y[:, -1] = 0  # one id never seen: the shared column
    dec = fit_ridge(X[None], Y, 0.05)
    C = dec.compact_scores(X[:4], 0)
    loo = ridge_loo_scores(dec, 0, X, C, compact_bags(Y, dec.active)[0][:4])
    for i in range(4):  # refit on the other 59 sentences with the same standardisation and penalty (lam * N)
        keep = torch.arange(N) != i
        Z = (X - dec.mean[0]) / dec.std[0]
        Yc = torch.cat([Y[:, dec.active], torch.zeros(N, 1)], 1)
        ybar = dec.b[0]  # the full fit's intercept, as the closed form assumes
        W = torch.linalg.solve(Z[keep].T @ Z[keep] + float(dec.lam[0]) * N * torch.eye(D), Z[keep].T @ (Yc[keep] - ybar))
        torch.testing.assert_close(loo[i], (Z[i] @ W + ybar)[0], rtol=1e-4, atol=1e-4)
