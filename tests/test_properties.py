"""Property-based tests (hypothesis) of the soft top-k and the routing, over random shapes, scales and masks.

`make test` runs the default number of examples; `make fuzz` runs many more (HYPOTHESIS_PROFILE=fuzz).
"""

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coda_adapters import Router, soft_topk
from coda_adapters.routing import token_budget

settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@st.composite
def problems(draw):
    """A batch of scores with a padding mask, a per-row k, a score scale and an epsilon."""
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e3]))
    epsilon = draw(st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0]))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=generator, dtype=torch.float64) * scale
    lengths = [draw(st.integers(1, n)) for _ in range(batch)]
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    if draw(st.booleans()):  # scattered holes instead of right padding
        mask = mask[:, torch.randperm(n, generator=generator)]
        mask[:, 0] |= ~mask.any(-1)
    n_valid = mask.sum(-1)
    k = torch.stack([torch.randint(0, int(v) + 1, (1,), generator=generator)[0] for v in n_valid])
    return scores, mask, k, epsilon


def bisection(scores, mask, k, epsilon):
    """Float64 reference: λ = min(1, exp((s - τ)/ε)) with τ found by bisection so that Σλ = k."""
    out = torch.zeros_like(scores)
    for row in range(scores.shape[0]):
        if int(k[row]) == 0:
            continue
        s = scores[row][mask[row]]
        low, high = float(s.min()) - 60 * epsilon - 1, float(s.max()) + 60 * epsilon + 1
        for _ in range(200):
            tau = (low + high) / 2
            if torch.clamp(torch.exp((s - tau) / epsilon), max=1).sum() > int(k[row]):
                low = tau
            else:
                high = tau
        out[row, mask[row]] = torch.clamp(torch.exp((s - (low + high) / 2) / epsilon), max=1)
    return out


@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_soft_topk_invariants(problem, dtype):
    scores, mask, k, epsilon = problem
    lam = soft_topk(scores.to(dtype), k, mask=mask, epsilon=epsilon)
    assert lam.dtype == torch.float32
    assert torch.isfinite(lam).all()
    assert (lam[~mask] == 0).all()
    assert (lam >= 0).all() and (lam <= 1).all()
    torch.testing.assert_close(lam.double().sum(-1), k.double(), atol=2e-3 * max(1, int(k.max())), rtol=0)


@given(problems())
def test_soft_topk_agrees_with_a_float64_reference(problem):
    scores, mask, k, epsilon = problem
    got = soft_topk(scores.float(), k, mask=mask, epsilon=epsilon).double()
    want = bisection(scores.float().double(), mask, k, epsilon)
    # float32 inputs: scores of size S carry a rounding error of ~6e-8 S, i.e. 6e-8 S / ε in the exponent
    tolerance = 1e-3 + 2e-7 * float(scores.abs().max()) / epsilon
    assert (got - want).abs().max() <= tolerance


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(1, 30))
    lengths = [draw(st.integers(1, n)) for _ in range(batch)]
    reduction = draw(st.sampled_from([1, 1.5, 2, 3, 5, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    keep_pooled = draw(st.booleans())
    return lengths, n, reduction, seed, keep_pooled


@given(batches())
def test_routing_invariants(case):
    lengths, n, reduction, seed, keep_pooled = case
    torch.manual_seed(seed)
    router = Router(8)
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    budget = token_budget(valid, (len(lengths), n), reduction, 0 if keep_pooled else None)
    hidden = torch.randn(len(lengths), n, 8)
    selection = router(hidden, budget)
    again = router(hidden, budget)
    assert torch.equal(selection.index, again.index) and torch.equal(selection.weights, again.weights)
    for row, length in enumerate(lengths):
        positions = selection.index[row][selection.slot_mask[row]].tolist()
        assert len(positions) == math.ceil(length / reduction - 1e-9)
        assert positions == sorted(set(positions))  # sorted and unique
        assert all(p < length for p in positions)  # padding never selected
        if keep_pooled:
            assert positions[0] == 0
    # padding invariance: an example alone selects the same tokens as inside the padded batch
    row = 0
    alone = router(
        hidden[row : row + 1, : lengths[row]],
        token_budget(None, (1, lengths[row]), reduction, 0 if keep_pooled else None),
    )
    assert torch.equal(alone.index[0][alone.slot_mask[0]], selection.index[row][selection.slot_mask[row]])
