"""The layout the README promises: the library (everything but hessian_tools.app) imports nothing from
the application, and the public API exports what the README leads with."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hessian_tools as ht

PACKAGE = Path(ht.__file__).resolve().parent
LIBRARY = sorted(
    p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_has_modules_to_check():
    names = {_module_name(p) for p in LIBRARY}
    assert {
        "hessian_tools.operators.hessian",
        "hessian_tools.estimators.trace",
        "hessian_tools.bounds.pacbayes",
        "hessian_tools.stability",
        "hessian_tools.optim.nso",
        "hessian_tools.stats",
    } <= names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: _module_name(p))
def test_library_module_imports_nothing_from_the_application(path):
    offending = sorted(
        m for m in _imported_modules(path) if m == "hessian_tools.app" or m.startswith("hessian_tools.app.")
    )
    assert not offending, f"{_module_name(path)} imports {offending}"


def test_importing_the_whole_library_loads_no_application_module():
    modules = " ".join(_module_name(p) for p in LIBRARY)
    code = (
        f"import sys, importlib\nfor m in {modules.split()!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('hessian_tools.app')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_public_api_exports_the_headline_functions():
    for name in (
        "HessianOperator",
        "LinearOperator",
        "EmpiricalRisk",
        "trace",
        "eigenvalues",
        "density",
        "noise_stability",
        "stability_curve",
        "pac_bayes_certificate",
        "hessian_measures",
        "paired_traces",
        "NSO",
        "SAM",
        "ASAM",
        "WeightPerturbation",
        "make_optimizer",
        "GGNOperator",
        "FisherOperator",
        "ggn_trace",
        "control_variate_trace",
    ):
        assert callable(getattr(ht, name)), name
    assert set(ht.__all__) >= {
        "noise_stability",
        "pac_bayes_certificate",
        "NSO",
        "GGNOperator",
        "FisherOperator",
        "ggn_trace",
        "control_variate_trace",
        "ControlVariateTraceResult",
    }
