"""The router: how many tokens, which ones, and in what order."""

import pytest
import torch

from coda_adapters import Router
from coda_adapters.layer import dense_selection
from coda_adapters.routing import num_selected_tokens, relative_position_bins, router_z_loss, token_budget


def padded_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def test_k_is_ceil_of_valid_tokens_over_reduction():
    valid = padded_mask([10, 9, 3, 1], 10)
    assert num_selected_tokens(valid, 3).tolist() == [4, 3, 1, 1]
    assert num_selected_tokens(valid, 1).tolist() == [10, 9, 3, 1]
    assert num_selected_tokens(padded_mask([12], 12), 4).tolist() == [3]
    assert num_selected_tokens(padded_mask([512], 512), 3).tolist() == [171]


def test_row_without_valid_token_is_an_error():
    with pytest.raises(ValueError, match="row 1 has no valid token"):
        num_selected_tokens(padded_mask([3, 0], 4), 2)


@pytest.mark.parametrize("settings", [dict(kind="learned"), dict(kind="random"), dict(method="coordinate_descent")])
def test_selection_is_sorted_unique_never_padding_and_keeps_forced(settings):
    torch.manual_seed(0)
    router = Router(16, **settings)
    lengths = [20, 13, 5, 2]
    budget = token_budget(padded_mask(lengths, 20), (4, 20), reduction=3, forced_position=0)
    selection = router(torch.randn(4, 20, 16), budget)
    for row, length in enumerate(lengths):
        k = -(-length // 3)
        positions = selection.index[row][selection.slot_mask[row]].tolist()
        assert len(positions) == k == int(selection.num_selected[row])
        assert positions == sorted(set(positions))
        assert all(p < length for p in positions)
        assert positions[0] == 0
        trace = selection.trace()[row].tolist()
        assert trace == positions + [-1] * (selection.index.shape[1] - k)
        every_slot = selection.index[row].tolist()  # empty slots point at distinct unselected positions
        assert len(set(every_slot)) == len(every_slot) and every_slot[:k] == positions
    assert torch.equal(
        selection.weights[~selection.slot_mask], torch.zeros_like(selection.weights[~selection.slot_mask])
    )


def test_dense_selection_keeps_every_real_token_in_order_and_fills_empty_slots_with_padding():
    valid = padded_mask([6, 3, 1], 6)
    valid[1] = valid[1].flip(-1)  # left padding
    selection = dense_selection(token_budget(valid, (3, 6), reduction=1, forced_position=None))
    assert selection.trace().tolist() == [[0, 1, 2, 3, 4, 5], [3, 4, 5, -1, -1, -1], [0, -1, -1, -1, -1, -1]]
    assert selection.index.tolist()[1:] == [[3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert selection.weights.tolist() == selection.slot_mask.float().tolist()


def test_learned_router_picks_the_highest_scores_and_weights_them_by_soft_top_k():
    router = Router(4, epsilon=0.05)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    hidden = torch.zeros(1, 6, 4)
    hidden[0, :, 0] = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.9, 0.0])
    selection = router(hidden, token_budget(None, (1, 6), reduction=2, forced_position=None))
    assert selection.index.tolist() == [[1, 3, 4]]
    assert (selection.weights > 0.5).all()
    torch.testing.assert_close(selection.weights.sum(), torch.tensor(3.0), atol=1e-4, rtol=0)


def test_forced_token_gets_weight_one_even_with_the_lowest_score():
    router = Router(4)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    hidden = torch.zeros(1, 9, 4)
    hidden[0, :, 0] = torch.arange(9.0)
    selection = router(hidden, token_budget(None, (1, 9), reduction=3, forced_position=0))
    assert selection.index.tolist() == [[0, 7, 8]]
    assert selection.weights[0, 0] == 1.0


def test_non_finite_router_scores_are_an_error():
    router = Router(4)
    hidden = torch.randn(1, 6, 4)
    hidden[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="router scores are not finite"):
        router(hidden, token_budget(None, (1, 6), reduction=2, forced_position=None))


def test_router_gradient_flows_through_the_soft_top_k():
    router = Router(8, epsilon=1.0)
    hidden = torch.randn(2, 10, 8)
    selection = router(hidden, token_budget(None, (2, 10), reduction=2, forced_position=None))
    (selection.weights * torch.randn(2, 5)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["exact", "coordinate_descent"])
def test_a_straight_through_router_weights_every_selected_token_one_and_learns_the_soft_gradient(method):
    """The same tokens as the soft router, λ exactly 1 (0 in empty slots), and the soft router's gradient."""
    torch.manual_seed(2)
    soft, straight = Router(8, epsilon=0.5, method=method), Router(8, epsilon=0.5, method=method, straight_through=True)
    straight.load_state_dict(soft.state_dict())
    hidden = torch.randn(2, 12, 8)
    budget = token_budget(padded_mask([12, 7], 12), (2, 12), reduction=3, forced_position=0)
    mix = torch.randn(2, 4)
    grads, selections = [], []
    for router in (soft, straight):
        selection = router(hidden, budget)
        (selection.weights * mix).sum().backward()
        grads.append(router.weight.grad)
        selections.append(selection)
    assert torch.equal(selections[0].index, selections[1].index)
    assert torch.equal(selections[1].weights, selections[1].slot_mask.float())
    assert not torch.equal(selections[0].weights, selections[1].weights)  # the soft weights are below 1
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[1].abs().sum() > 0
    with torch.no_grad():  # at inference: the hard weights, no soft term
        assert torch.equal(straight(hidden, budget).weights, selections[1].slot_mask.float())


@pytest.mark.parametrize("method", ["exact", "coordinate_descent"])
def test_router_weights_are_the_soft_top_k_solution_at_the_selected_positions(method):
    """The router's fused top-k path agrees with the public soft_topk on the same problem."""
    from coda_adapters import soft_topk

    torch.manual_seed(1)
    router = Router(8, epsilon=0.3, method=method)
    lengths = [30, 22, 9]
    valid = padded_mask(lengths, 30)
    budget = token_budget(valid, (3, 30), reduction=3, forced_position=0)
    hidden = torch.randn(3, 30, 8)
    selection = router(hidden, budget)
    scores = router.scores(hidden)
    free = valid & ~budget.forced
    lam = soft_topk(scores, budget.num_selected - 1, mask=free, epsilon=0.3, method=method) + budget.forced
    want = lam.gather(-1, selection.index) * selection.slot_mask
    torch.testing.assert_close(selection.weights, want, atol=1e-5, rtol=0)
    hard = scores.masked_fill(~free, float("-inf"))
    for row, length in enumerate(lengths):
        k = -(-length // 3)
        best = set(hard[row].topk(k - 1).indices.tolist()) | {0}
        assert set(selection.index[row][selection.slot_mask[row]].tolist()) == best


def test_position_bins_count_real_tokens_only_so_left_and_right_padding_agree():
    lengths, n, bins = [10, 7, 3, 1], 10, 4
    right = padded_mask(lengths, n)
    left = right.flip(-1)
    got_right, got_left = relative_position_bins(right, bins), relative_position_bins(left, bins)
    for row, length in enumerate(lengths):
        want = [bins * place // length for place in range(length)]  # floor(bins * t / n_valid)
        assert got_right[row, :length].tolist() == want
        assert got_left[row, n - length :].tolist() == want
    assert got_right.min() >= 0 and got_left.max() <= bins - 1  # padding too stays in range


def test_a_decreasing_position_bias_alone_routes_each_rows_first_tokens_like_truncation():
    router = Router(4, position_bins=8, epsilon=0.05)
    with torch.no_grad():
        router.weight.zero_()
        router.position_bias.copy_(-torch.arange(8.0))
    lengths = [24, 16, 9]
    valid = padded_mask(lengths, 24).flip(-1)  # left padding: the first real token is not at position 0
    selection = router(torch.randn(3, 24, 4), token_budget(valid, (3, 24), reduction=4, forced_position=None))
    for row, length in enumerate(lengths):
        first = 24 - length
        k = -(-length // 4)
        positions = selection.index[row][selection.slot_mask[row]].tolist()
        # ties inside a bin may pick any of its tokens, so compare bins: the k best are the first bins' tokens
        bins = relative_position_bins(valid, 8)[row, positions].tolist()
        assert len(positions) == k and all(p >= first for p in positions)
        assert bins == sorted(relative_position_bins(valid, 8)[row, first:].tolist())[:k]


def test_the_position_bias_learns_through_the_soft_top_k():
    router = Router(8, epsilon=1.0, position_bins=4)
    selection = router(torch.randn(2, 10, 8), token_budget(None, (2, 10), reduction=2, forced_position=None))
    (selection.weights * torch.randn(2, 5)).sum().backward()
    assert router.position_bias.grad is not None and router.position_bias.grad.abs().sum() > 0


def test_a_random_router_takes_no_position_bias():
    with pytest.raises(ValueError, match="position_bins must be 0 for a random router, got 4"):
        Router(8, kind="random", position_bins=4)


def test_router_z_loss_is_the_mean_squared_logsumexp_of_real_token_scores_in_training_only():
    torch.manual_seed(0)
    lengths, hidden = [9, 4, 1], 8
    states = torch.randn(3, 9, hidden)
    budget = token_budget(padded_mask(lengths, 9), (3, 9), reduction=3, forced_position=0)
    routers = [Router(hidden, position_bins=2), Router(hidden)]
    with torch.no_grad():
        routers[0].position_bias.copy_(torch.tensor([0.5, -1.0]))
    selections = [router(states, budget) for router in routers]
    # reference in float64, one example at a time: scores of the real tokens, position bias by relative place
    squares = []
    with torch.no_grad():
        for router in routers:
            for row, length in enumerate(lengths):
                scores = states[row, :length].double() @ router.weight.double()
                if router.position_bias is not None:
                    bins = [min(2 * t // length, 1) for t in range(length)]
                    scores = scores + router.position_bias.double()[bins]
                squares.append(float(torch.logsumexp(scores, dim=0)) ** 2)
    want = (sum(squares[:3]) / 3 + sum(squares[3:]) / 3) / 2
    loss = router_z_loss(selections)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()  # the loss trains the routers' weights and position biases
    assert (
        all(router.weight.grad.abs().sum() > 0 for router in routers) and routers[0].position_bias.grad.abs().sum() > 0
    )
    # evaluation, random routers and dense layers add nothing; with nothing, the loss is zero
    routers[0].eval()
    assert routers[0](states, budget).score_logsumexp is None
    assert Router(hidden, kind="random")(states, budget).score_logsumexp is None
    assert router_z_loss([routers[0](states, budget), dense_selection(budget)]).item() == 0.0
