"""The package layering, read from the source (every import statement, top level or inside a function):

- kernels import only the standard library, torch and triton;
- serve never imports train, the embedded default (lragent.toy) or the command line;
- train never imports serve, lragent.toy or the command line (its ``python -m`` shim forwards to the CLI);
- the bundle package and the mode table import neither train nor serve (nor toy, nor the CLI);
- no test fixture ships in the installed packages.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": ROOT / "kernels" / "src", "serve": ROOT / "serve", "train": ROOT / "train",
            "bundle": ROOT / "lragent" / "bundle"}


def imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.add(f"<relative>.{node.module or ''}")
            else:
                out.add(node.module)
    return out


def files(pkg: str):
    return sorted(p for p in PACKAGES[pkg].rglob("*.py"))


def test_kernels_import_only_torch_triton_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"torch", "triton", "__future__"}
    for f in files("kernels"):
        for mod in imports(f):
            top = mod.split(".")[0]
            assert mod.startswith("<relative>") or top in allowed, f"{f.relative_to(ROOT)} imports {mod}"


@pytest.mark.parametrize("pkg,forbidden", [
    ("serve", ("lragent.train", "lragent.toy", "lragent.cli")),
    ("train", ("lragent.serve", "lragent.toy", "lragent.cli")),
    ("bundle", ("lragent.train", "lragent.serve", "lragent.toy", "lragent.cli")),
])
def test_library_packages_do_not_import_upwards(pkg, forbidden):
    checked = 0
    for f in files(pkg):
        if pkg == "train" and f.name == "__main__.py":
            assert imports(f) <= {"sys", "lragent.cli.train"}      # the accelerate entry shim only
            continue
        for mod in imports(f):
            assert not mod.startswith(forbidden), f"{f.relative_to(ROOT)} imports {mod}"
        checked += 1
    assert checked >= 3


def test_mode_table_is_plain_data():
    assert imports(ROOT / "lragent" / "modes.py") <= {"__future__", "dataclasses"}


def test_no_fixture_module_is_installed():
    for d in (ROOT / "lragent", *PACKAGES.values()):
        assert not list(d.rglob("testing.py")), f"a test fixture module ships in {d}"
