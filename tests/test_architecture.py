"""The layout's import rules (docs/architecture.md): which part may import which, read from the source."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("variants", "ablations", "analysis")  # the parts above the core
# The command line of `python -m dit.bench` takes variant and preset names: these functions resolve them.
BENCH_NAME_RESOLUTION = {"_variant_model", "_preset_run"}
OBJECTIVES_AND_SAMPLERS = ("dit/diffusion.py", "dit/flow.py", "dit/objectives.py", "dit/guidance.py", "dit/sample.py")
NETWORK = ("dit.model", "dit.layers", "dit.attention")


def imports(path: Path) -> list[tuple[str, str | None]]:
    """Every module the file imports, at module level or in a function: (module, enclosing function or None)."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: relative import; the project imports absolutely"
                found.append((child.module, function))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(ast.parse(path.read_text()), None)
    return found


def files(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py"))


def under(module: str, *parts: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


def test_the_core_imports_nothing_above_it():
    broken = [f"{path.relative_to(ROOT)} imports {module}" + (f" in {function}()" if function else "")
              for path in files("dit") for module, function in imports(path)
              if under(module, *UPPER) and not (path.name == "bench.py" and function in BENCH_NAME_RESOLUTION)]
    assert broken == []
    # The exception is what it says: the bench's name resolution does import the registry.
    bench = imports(ROOT / "dit" / "bench.py")
    assert {function for module, function in bench if under(module, *UPPER)} == BENCH_NAME_RESOLUTION


def test_objectives_and_samplers_never_import_the_network():
    broken = [f"{name} imports {module}" for name in OBJECTIVES_AND_SAMPLERS
              for module, _ in imports(ROOT / name) if under(module, *NETWORK)]
    assert broken == []


def test_the_registry_imports_neither_the_launcher_nor_the_analysis():
    broken = [f"{path.relative_to(ROOT)} imports {module}" for path in files("variants")
              for module, _ in imports(path) if under(module, "ablations", "analysis")]
    assert broken == []


def test_the_analysis_needs_no_jax_and_no_launcher():
    broken = [f"{path.relative_to(ROOT)} imports {module}" for path in files("analysis")
              for module, _ in imports(path) if under(module, "ablations", "jax", "flax", "optax")]
    assert broken == []
    # What the analysis imports from the core and the registry loads no JAX either (it runs where none is installed).
    modules = [f"analysis.{path.stem}" for path in files("analysis") if path.stem not in ("__init__", "__main__")]
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax', 'ablations'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_rules_catch_a_broken_import(tmp_path):
    # The reader sees imports inside functions too, where a forbidden import would otherwise hide.
    source = tmp_path / "module.py"
    source.write_text("import numpy\n\ndef f():\n    from variants import resolve\n")
    assert imports(source) == [("numpy", None), ("variants", "f")]
