"""Show which tokens the router sent through each frozen layer: in the terminal, as HTML or as a PNG."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model import CodaModel


@dataclass
class Explanation:
    """Routing of one text: ``kept[layer][i]`` is True if token ``i`` went through that frozen layer."""

    text: str
    tokens: list[str]
    kept: dict[int, list[bool]]
    label: str
    probability: float


def explain_texts(
    model: CodaModel, tokenizer: Any, texts: list[str], label_names: list[str], max_length: int
) -> list[Explanation]:
    """Run the classifier on ``texts`` and read its routing trace."""
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        probabilities = model(**batch).logits.float().softmax(-1)
    trace = model.routing_trace()
    explanations = []
    for row, text in enumerate(texts):
        length = int(batch["attention_mask"][row].sum())
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][:length].tolist())
        kept = {}
        for layer, positions in trace.items():
            chosen = {int(p) for p in positions[row] if p >= 0}
            kept[layer] = [i in chosen for i in range(length)]
        best = int(probabilities[row].argmax())
        explanations.append(Explanation(text, tokens, kept, label_names[best], float(probabilities[row, best])))
    return explanations


def as_text(explanation: Explanation) -> str:
    """One line per layer, routed tokens in [brackets]."""
    lines = [f"{explanation.label} (p={explanation.probability:.3f}): {explanation.text[:100]}"]
    for layer, kept in explanation.kept.items():
        shown = " ".join(f"[{t}]" if k else t for t, k in zip(explanation.tokens, kept, strict=True))
        lines.append(f"  layer {layer} ({sum(kept)}/{len(kept)} tokens): {shown}")
    return "\n".join(lines)


def write_html(explanations: list[Explanation], path: str | Path) -> None:
    """A page with one table per text: rows are layers, routed tokens highlighted."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>CoDA routing</title>",
        "<style>body{font-family:sans-serif} td{padding:2px 6px} .kept{background:#ffd54f} "
        ".skip{color:#999} .tok{display:inline-block;margin:1px;padding:1px 3px;border-radius:3px}</style>",
        "<h1>Which tokens each layer's frozen Transformer processed</h1>",
        "<p>Highlighted tokens went through the frozen layer; the others got only the adapter.</p>",
    ]
    for explanation in explanations:
        parts.append(f"<h2>{html.escape(explanation.label)} (p={explanation.probability:.3f})</h2><table>")
        for layer, kept in explanation.kept.items():
            cells = "".join(
                f"<span class='tok {'kept' if k else 'skip'}'>{html.escape(t)}</span>"
                for t, k in zip(explanation.tokens, kept, strict=True)
            )
            parts.append(f"<tr><td>layer&nbsp;{layer}</td><td>{sum(kept)}/{len(kept)}</td><td>{cells}</td></tr>")
        parts.append("</table>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")


def write_png(explanations: list[Explanation], path: str | Path, max_tokens: int = 80) -> None:
    """A heat-map per text: layers down, tokens across (the first ``max_tokens``), routed cells dark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.6 + 0.3 * len(e.kept) for e in explanations]
    figure, axes = plt.subplots(
        len(explanations), 1, figsize=(min(24, 2 + 0.22 * max_tokens), sum(heights) + 1), squeeze=False
    )
    for axis, explanation in zip(axes[:, 0], explanations, strict=True):
        layers = list(explanation.kept)
        grid = [[float(k) for k in explanation.kept[layer][:max_tokens]] for layer in layers]
        axis.imshow(grid, aspect="auto", cmap="Oranges", vmin=0, vmax=1.2, interpolation="nearest")
        tokens = explanation.tokens[:max_tokens]
        axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers], fontsize=7)
        axis.set_title(f"{explanation.label} (p={explanation.probability:.2f}): {explanation.text[:80]}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
