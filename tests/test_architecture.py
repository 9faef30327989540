"""The package's imports point one way: a layer may import itself and the layers below it, never one above.

    cli -> serve / train -> testing -> pipelines -> runtime -> checkpoints -> world -> models -> files

models/ is plain PyTorch (the math); world/ renders procedural scenes from the models' camera code;
checkpoints/ knows file formats and builds models from them; runtime/ places and streams them on devices;
pipelines/ are the jobs (generation, the real-time chunk loop); testing/ writes tiny checkpoints (tests and the
demo) and measures the shipped world model; serve/ and train/ are the web server and trainers; cli/ is the
command line; assets/ holds data files only (the shipped world checkpoint). Every import counts, including
those inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS: list[set[str]] = [{"cli", "__main__"}, {"serve", "train"}, {"testing"}, {"pipelines"}, {"runtime"},
                          {"checkpoints"}, {"world"}, {"models"}, {"files", "assets"}]
PACKAGE = Path(__file__).resolve().parent.parent / "src" / "worldstream"


def layer_of(part: str) -> int:
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise KeyError(f"{part!r} is in no layer of the import order; add it to LAYERS")


def _module_parts(path: Path, root: Path) -> list[str]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path, root: Path, package: str) -> list[tuple[int, list[str]]]:
    """(line, module parts below `package`) of every import of `package` in the file at `path`."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_parts(path, root)
    pkg_parts = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == package:
                    out.append((node.lineno, names[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:   # `from . import x`: x is a module of the package
                    out += [(node.lineno, target + [a.name]) for a in node.names]
                    continue
                out.append((node.lineno, target))
            elif node.module and node.module.split(".")[0] == package:
                out.append((node.lineno, node.module.split(".")[1:]))
    return out


def upward_imports(root: Path, package: str = "worldstream") -> list[str]:
    """Every import in the package under `root` that points to a higher layer, as 'file:line: a -> b'."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        parts = _module_parts(path, root)
        if not parts:
            continue              # the package's own __init__
        src = layer_of(parts[0])
        for line, target in imported_modules(path, root, package):
            if not target:
                continue          # `import worldstream` itself
            dst = layer_of(target[0])
            if dst < src:
                problems.append(f"{path.relative_to(root)}:{line}: {parts[0]} -> {target[0]}")
    return problems


def test_the_package_imports_only_downwards():
    assert upward_imports(PACKAGE) == []


def test_every_top_level_module_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith((".", "__pycache__")) or (path.is_file() and path.suffix != ".py"):
            continue
        name = path.stem if path.is_file() else path.name
        if name == "__init__":
            continue
        layer_of(name)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "worldstream" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "worldstream"


@pytest.mark.parametrize("importer, line, arrow", [
    ("models/dit.py", "from ..runtime import streaming", "models -> runtime"),
    ("models/dit.py", "def f():\n    from worldstream.pipelines.generate import run", "models -> pipelines"),
    ("checkpoints/t5.py", "import worldstream.runtime.slab", "checkpoints -> runtime"),
    ("runtime/planner.py", "from .. import pipelines", "runtime -> pipelines"),
    ("files.py", "from .models import dit", "files -> models"),
])
def test_the_checker_finds_an_upward_arrow(tmp_path, importer, line, arrow):
    """The checker itself, on a synthetic tree: a clean tree passes; one upward import (relative, absolute, or
    hidden inside a function) is reported with its file, line and arrow."""
    files = {"__init__.py": "", "files.py": "", "models/__init__.py": "", "models/dit.py": "import torch\n",
             "checkpoints/__init__.py": "", "checkpoints/t5.py": "from ..models import dit\n",
             "runtime/__init__.py": "", "runtime/slab.py": "", "runtime/streaming.py": "",
             "runtime/planner.py": "from . import slab\nfrom ..checkpoints.t5 import x\n",
             "pipelines/__init__.py": "", "pipelines/generate.py": "from ..runtime.planner import plan\n",
             "cli.py": "from .pipelines import generate\nimport worldstream.files\n"}
    root = _write(tmp_path, files)
    assert upward_imports(root) == []
    (root / importer).write_text((root / importer).read_text() + line + "\n")
    problems = upward_imports(root)
    assert len(problems) == 1 and problems[0].startswith(importer) and problems[0].endswith(arrow), problems


def test_the_checker_refuses_a_folder_outside_the_order(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "gadgets/__init__.py": "from ..models import dit\n"})
    with pytest.raises(KeyError, match="gadgets"):
        upward_imports(root)
