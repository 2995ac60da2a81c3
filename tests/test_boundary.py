"""The library/application boundary: the library (everything in coda_adapters but app/ and __main__.py)
imports nothing from the application and no third-party package but torch, transformers, safetensors and
peft; and it wraps and runs a model with the application's dependencies unavailable."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "coda_adapters"
LIBRARY_DEPENDENCIES = {"torch", "transformers", "safetensors", "peft"}


def library_files() -> list[Path]:
    files = [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "app" and path.name != "__main__.py"
    ]
    assert len(files) > 10, files  # the scan did find the library
    return files


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a library file, relative ones resolved; for
    ``from X import a`` both ``X`` and ``X.a`` (``a`` may be a submodule)."""
    # the package a file's relative imports start from: ("coda_adapters", "bindings") for bindings/bert.py
    # and for bindings/__init__.py alike
    package = path.relative_to(PACKAGE.parent).parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.append((node.lineno, module))
            names += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return names


def test_imported_modules_resolves_relative_imports():
    bert = imported_modules(PACKAGE / "bindings" / "bert.py")
    assert any(name.startswith("coda_adapters.bindings.base") for _, name in bert)
    init = imported_modules(PACKAGE / "__init__.py")
    assert any(name.startswith("coda_adapters.config") for _, name in init)
    assert all(not name.startswith(".") for _, name in bert + init)


def test_the_library_never_imports_the_application():
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in library_files()
        for line, name in imported_modules(path)
        if name == "coda_adapters.app" or name.startswith("coda_adapters.app.")
    ]
    assert not offenders, offenders


def test_the_library_imports_only_the_standard_library_and_its_four_dependencies():
    allowed = set(sys.stdlib_module_names) | LIBRARY_DEPENDENCIES | {"coda_adapters"}
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in library_files()
        for line, name in imported_modules(path)
        if name.partition(".")[0] not in allowed
    ]
    assert not offenders, offenders


# Run in a fresh interpreter. matplotlib, scikit-learn and accelerate are hidden as if not installed (a
# sys.meta_path finder refuses them, and availability probes through importlib.util.find_spec, which
# transformers makes for accelerate, answer None). tqdm cannot be hidden: transformers itself imports it
# (transformers.utils.logging); so the import hook refuses all four to the library's own modules, which
# catches an import of an already-loaded module too.
APP_FREE_FORWARD = textwrap.dedent(
    """
    import builtins
    import importlib.util
    import sys

    HIDDEN = ("matplotlib", "sklearn", "accelerate")
    REFUSED_TO_THE_LIBRARY = (*HIDDEN, "tqdm")


    def top(name):
        return name.partition(".")[0] if isinstance(name, str) else ""


    def is_library(module_name):
        return module_name == "coda_adapters" or (
            module_name.startswith("coda_adapters.") and not module_name.startswith("coda_adapters.app")
        )


    class Hidden:
        def find_spec(self, name, path=None, target=None):
            if top(name) in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the boundary test)", name=name)
            return None


    real_import, real_find_spec = builtins.__import__, importlib.util.find_spec


    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and top(name) in REFUSED_TO_THE_LIBRARY and is_library(importer):
            raise ImportError(f"the library module {importer} imports {name}, an application dependency")
        return real_import(name, globals, locals, fromlist, level)


    def guarded_find_spec(name, package=None):
        return None if top(name) in HIDDEN else real_find_spec(name, package)


    sys.meta_path.insert(0, Hidden())
    builtins.__import__ = guarded_import
    importlib.util.find_spec = guarded_find_spec

    import torch
    from transformers import BertConfig, BertModel

    from coda_adapters import CodaConfig, get_coda_model

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    coda = get_coda_model(BertModel(config).eval(), CodaConfig(reduction=3, bottleneck=8))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        hidden = coda(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (2, 12, 32), hidden.shape
    trace = coda.routing_trace()
    assert sorted(trace) == [0, 1], trace  # an entry per layer
    assert all(positions.shape == (2, 4) for positions in trace.values()), trace

    loaded = sorted(name for name in sys.modules if top(name) in HIDDEN or name.startswith("coda_adapters.app"))
    assert not loaded, f"loaded: {loaded}"
    held = sorted(
        f"{module_name}.{attribute}"
        for module_name, module in list(sys.modules.items())
        if module is not None and is_library(module_name)
        for attribute, value in vars(module).items()
        if top(getattr(value, "__module__", None) or getattr(value, "__name__", None)) in REFUSED_TO_THE_LIBRARY
    )
    assert not held, f"library modules hold application dependencies: {held}"
    print("app-free forward ok")
    """
)


def test_the_library_wraps_and_runs_a_model_without_the_application_dependencies():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", APP_FREE_FORWARD], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "app-free forward ok" in result.stdout
