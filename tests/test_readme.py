"""The README's code stays true: its BERT binding is the real one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_shows_the_complete_bert_binding():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Adding an architecture") :]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip()
    source = (ROOT / "src" / "coda_adapters" / "bindings" / "bert.py").read_text(encoding="utf-8")
    assert shown == source[source.index("@register_binding") :].strip()
