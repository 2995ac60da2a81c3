"""Export-friendly routing for the TorchScript ONNX exporter, swapped in while it traces (see ``export.py``).

The library's routing makes a few Python-side decisions on tensor values (the ``dense``/``uniform``
shortcuts, ``int(k.max())``) and updates the hidden states in place; the tracer would freeze those
decisions at the traced batch's values and drop the in-place updates. The equivalents here compute the
same values for every batch (``tests/app/test_export.py`` compares them with the library's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import layer as layer_module
from .. import pooling as pooling_module
from .. import routing as routing_module
from ..routing import token_budget as library_token_budget


def _add_tokens(hidden_states: torch.Tensor, flat_index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``layer.add_tokens_`` out of place, exported as one ``ScatterND(reduction="add")`` (:class:`_AddRows`).

    The library adds in place through a view (``index_add_``), a mutation the TorchScript tracer loses: the
    frozen layers' updates vanished from the graph. ``reduction="add"`` adds the update to the rows in the one
    operator. The rows are distinct (empty slots included, see ``routing.selected_first``): ONNX Runtime runs
    ScatterND on several threads without atomics, so two updates of one row could lose one.
    """
    hidden = hidden_states.shape[-1]
    flat = _AddRows.apply(hidden_states.reshape(-1, hidden), flat_index, update.reshape(-1, hidden))
    return flat.reshape(hidden_states.shape)


class _AddRows(torch.autograd.Function):
    """``rows [n, hidden]`` with ``update [m, hidden]`` added at rows ``index [m]`` (out of place).

    In the graph this is ``ScatterND(reduction="add")`` on whole rows (opset 16). ``scatter_add`` would become
    ``ScatterElements(reduction="add")``, which takes an index per element: in a MiniLM export at r = 3
    (8 x 512 tokens, one thread, ``examples/onnx_profile.py``) it took 7% of ONNX Runtime's kernel time,
    ScatterND takes 1%.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return rows.index_add(0, index, update)

    @staticmethod
    def symbolic(g: Any, rows: Any, index: Any, update: Any) -> Any:
        return g.op("ScatterND", rows, g.op("Unsqueeze", index, _constant(g, [-1])), update, reduction_s="add")


def _token_budget(
    padding_mask: torch.Tensor | None,
    shape: tuple[int, int],
    reduction: float,
    forced_position: int | str | None,
    device: torch.device | str = "cpu",
    *,
    keep_first: int = 0,
    keep_last: int = 0,
) -> routing_module.TokenBudget:
    """``routing.token_budget`` without shortcuts that depend on the batch's values.

    ``dense`` (every example keeps all its tokens) and ``uniform`` (one ``k`` for all examples) are Python
    booleans the tracer would freeze at the example batch's values: a graph traced on equal lengths would
    never mask empty slots. The general path is exact for every batch, so both are off unless they hold for
    every batch (``r = 1``; no padding mask and no kept tokens, which can raise ``k`` above ``n / r``).
    """
    kept = dict(keep_first=keep_first, keep_last=keep_last)
    budget = library_token_budget(padding_mask, shape, reduction, forced_position, device, **kept)
    dense = budget.dense and reduction <= 1
    uniform = budget.uniform and padding_mask is None and not (keep_first or keep_last)
    return budget._replace(dense=dense, uniform=uniform)


def _rank_top_k(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``routing._rank_top_k`` with ``max(k)`` passed to ``topk`` as a tensor: the library's ``int(k.max())``
    would become the example batch's constant, while a tensor becomes the TopK's ``k`` input, computed from
    each batch's attention mask."""
    ranking = scores.detach().masked_fill(~valid, float("-inf"))
    if forced is not None:
        ranking = ranking.masked_fill(forced, float("inf"))
    top_values, top_index = ranking.topk(k.max(), dim=-1)
    in_top = torch.arange(top_index.shape[-1], device=scores.device) < k[:, None]
    return top_values, top_index, in_top


class _FixedNormalizedShape:
    """``torch.nn.functional`` as ``pooling.py`` sees it, with ``layer_norm``'s ``normalized_shape`` as plain ints.

    ``MeanPooler`` passes ``pooled.shape[-1:]``, which the tracer records as a list computed from the input's
    shape, and the exporter's LayerNormalization needs constants; the hidden size is fixed anyway.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)

    @staticmethod
    def layer_norm(values: torch.Tensor, normalized_shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.nn.functional.layer_norm(values, [int(size) for size in normalized_shape], *args, **kwargs)


def _constant(g: Any, value: Any, like: Any = None) -> Any:
    """An ONNX constant, cast to the type of ``like`` if given (CastLike: opset 15)."""
    constant = g.op("Constant", value_t=torch.tensor(value))
    return constant if like is None else g.op("CastLike", constant, like)


def _reduce_last_axis(g: Any, op: str, values: Any, keepdims: int) -> Any:
    """ReduceMax / ReduceSum over the last axis (axes became an input in opset 13 for ReduceSum, 18 for the rest)."""
    if g.opset >= 18 or (op == "ReduceSum" and g.opset >= 13):
        return g.op(op, values, _constant(g, [-1]), keepdims_i=keepdims)
    return g.op(op, values, axes_i=[-1], keepdims_i=keepdims)


def _log_sum_exp_last_axis(g: Any, values: Any) -> Any:
    """log Σ exp over the last axis, shifted by the maximum: exact where entries are -inf (all -inf gives -inf)."""
    peak = _reduce_last_axis(g, "ReduceMax", values, keepdims=1)
    peak = g.op("Where", g.op("IsInf", peak), _constant(g, 0.0, like=peak), peak)
    total = _reduce_last_axis(g, "ReduceSum", g.op("Exp", g.op("Sub", values, peak)), keepdims=0)
    return g.op("Add", g.op("Log", total), g.op("Squeeze", peak, _constant(g, [-1])))


@torch.onnx.symbolic_helper.parse_args("v", "i")
def _logcumsumexp_symbolic(g: Any, values: Any, dim: int) -> Any:
    """``aten::logcumsumexp`` along the last axis, which the TorchScript exporter lacks (the exact soft top-k
    uses it on the top-k scores). Output ``i`` is a log-sum-exp over the entries ``j <= i``, taken pairwise
    (``k × k`` per row): a running sum of ``exp(x - max)`` would underflow for scores far below the row's
    maximum, which a trained router produces."""
    rank = values.type().dim()
    if dim != -1 and (rank is None or dim != rank - 1):
        raise torch.onnx.errors.SymbolicValueError("logcumsumexp is exported along the last dimension only", values)
    size = g.op("Gather", g.op("Shape", values), _constant(g, -1), axis_i=0)
    positions = g.op("Range", _constant(g, 0), size, _constant(g, 1))
    later = g.op(
        "Greater", g.op("Unsqueeze", positions, _constant(g, [0])), g.op("Unsqueeze", positions, _constant(g, [1]))
    )
    infinity = _constant(g, float("-inf"), like=values)
    pairs = g.op("Where", later, infinity, g.op("Unsqueeze", values, _constant(g, [-2])))
    return _log_sum_exp_last_axis(g, pairs)


@torch.onnx.symbolic_helper.parse_args("v", "v")
def _logaddexp_symbolic(g: Any, first: Any, second: Any) -> Any:
    """``aten::logaddexp``, which the TorchScript exporter lacks, shifted by the larger input (exact at -inf)."""
    peak = g.op("Max", first, second)
    peak = g.op("Where", g.op("IsInf", peak), _constant(g, 0.0, like=peak), peak)
    total = g.op("Add", g.op("Exp", g.op("Sub", first, peak)), g.op("Exp", g.op("Sub", second, peak)))
    return g.op("Add", g.op("Log", total), peak)


SYMBOLICS: dict[str, Callable[..., Any]] = {
    "aten::logcumsumexp": _logcumsumexp_symbolic,
    "aten::logaddexp": _logaddexp_symbolic,
}
SYMBOLIC_OPSET = 9  # registered from this opset up


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def traceable_routing() -> Iterator[None]:
    """While the tracer runs: export-friendly equivalents of three library functions (:func:`_add_tokens`,
    :func:`_token_budget`, :func:`_rank_top_k`) and of the mean pooler's ``layer_norm`` call
    (:class:`_FixedNormalizedShape`), and ONNX translations of two operators the exporter lacks.

    The equivalents compute the same values as the library for every batch (the export's check and the tests
    compare against the unpatched model). They are module attributes swapped for the duration only, so the
    library's files stay as they are; a PyTorch forward in another thread meanwhile would take them too, and
    get the same results.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_replaced(layer_module, "add_tokens_", _add_tokens))
        stack.enter_context(_replaced(layer_module, "token_budget", _token_budget))
        stack.enter_context(_replaced(routing_module, "_rank_top_k", _rank_top_k))
        stack.enter_context(_replaced(pooling_module, "F", _FixedNormalizedShape()))
        for name, symbolic in SYMBOLICS.items():
            torch.onnx.register_custom_op_symbolic(name, symbolic, SYMBOLIC_OPSET)
            stack.callback(torch.onnx.unregister_custom_op_symbolic, name, SYMBOLIC_OPSET)
        yield
