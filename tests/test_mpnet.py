"""MPNet: a routed layer sees the relative position bias of its selected tokens' original positions."""

import copy

import torch
from transformers.masking_utils import create_bidirectional_mask

from coda_adapters import CodaConfig, get_coda_model

from helpers import (
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens,
    padded_batch,
    randomize_trainable,
    tiny_model,
)


def test_routed_layer_sees_the_relative_position_bias_of_the_original_positions():
    """The position bias of the selected tokens is built here from their original positions."""
    base = tiny_model("mpnet")
    frozen_layer = copy.deepcopy(base.encoder.layer[0])
    coda = get_coda_model(base, CodaConfig(reduction=3, bottleneck=8, epsilon=0.5))
    randomize_trainable(coda)
    differences = []

    def frozen_on_selected(x_sel, positions):
        relative = positions[None, :] - positions[:, None]  # key position - query position
        buckets = base.encoder.relative_position_bucket(relative, num_buckets=32)
        bias = base.encoder.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        mask = create_bidirectional_mask(base.config, x_sel, torch.ones(1, len(positions)))
        right = frozen_layer(x_sel, mask, bias)[0]
        wrong = frozen_layer(x_sel, mask, base.encoder.compute_position_bias(x_sel))[0]  # positions 0..k-1
        differences.append((right - wrong).abs().max())
        return right

    ids, mask = padded_batch([15, 10], 15)
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected)
    assert min(differences) > 1e-4  # the test can tell the original positions from renumbered ones
