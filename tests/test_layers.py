"""The layer rule of docs/DESIGN.md ("imports go down only") checked on the import graph, lazy imports included.

Every ``import`` / ``from ... import`` statement of the project's packages is read with ``ast`` (also the ones inside
functions: a lazy import is still an edge), mapped to the layer of the importing file and of the imported module,
and an edge to a layer the importer may not use is an error. ``python tests/test_layers.py`` prints the upward
edges (``file:line importer-layer -> module (layer)``), one a line, and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import besides itself (docs/DESIGN.md, "Layers"); the longest matching prefix of a
# module's dotted name gives its layer. ``block`` is the services' layer (engine, predictor, scheduler, benchmark,
# provisioning and the modules they share: service, sse, http, prom, openai_params).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "vidur": frozenset(),
    "data": frozenset({"vidur"}),
    "block.policies": frozenset({"vidur"}),
    "length_estimation": frozenset({"vidur", "data"}),
    "analysis": frozenset({"vidur"}),  # the run-record format (vidur.records) and nothing else of the simulator
    "block": frozenset({"vidur", "data", "block.policies", "length_estimation", "block.ports"}),
    "block.deploy": frozenset({"vidur", "block.ports"}),  # configs and Fabric; it starts services by their command lines
    "block.ports": frozenset(),  # free ports for services started later: standard library only, for anyone
    "experiments": frozenset({"vidur", "data", "block.policies", "length_estimation", "block", "block.deploy",
                              "block.ports", "analysis"}),
}
PACKAGES = ("vidur", "data", "block", "length_estimation", "analysis", "experiments")


@dataclass(frozen=True)
class Edge:
    """One import statement: ``path:line`` of the importer, its module, the imported module and both layers."""

    path: str
    line: int
    importer: str
    imported: str
    src_layer: str
    dst_layer: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.src_layer} -> {self.imported} ({self.dst_layer})"


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (None: not ours, e.g. numpy)."""
    best = None
    for name in MAY_IMPORT:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def module_of(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    p = root / Path(*dotted.split("."))
    return p.is_dir() or p.with_suffix(".py").is_file()


def _imported(node: ast.AST, module: str, is_package: bool, root: Path = ROOT) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importer's package
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # ``from pkg import sub`` may name a submodule: keep the deeper name when it is one of ours
        return [f"{target}.{a.name}" if _is_module(root, f"{target}.{a.name}") else target for a in node.names]
    return []


def edges(root: Path = ROOT) -> list[Edge]:
    """Every import edge between two of the project's layers."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            module = module_of(path, root)
            src = layer_of(module)
            if src is None:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                for target in dict.fromkeys(_imported(node, module, path.name == "__init__.py", root)):
                    dst = layer_of(target)
                    if dst is not None:
                        out.append(Edge(str(path.relative_to(root)), node.lineno, module, target, src, dst))
    return out


def upward(all_edges: list[Edge]) -> list[Edge]:
    """The edges that break the layer rule."""
    return [e for e in all_edges if e.dst_layer != e.src_layer and e.dst_layer not in MAY_IMPORT[e.src_layer]]


# ---------------------------------------------------------------------------------------------------- tests
def test_no_upward_import():
    bad = upward(edges())
    assert not bad, "imports against the layer rule (docs/DESIGN.md):\n" + "\n".join(map(str, bad))


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative import are edges; a layer above is caught."""
    pkg = tmp_path / "vidur"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from experiments.wiring import x\n    from . import b\n")
    (pkg / "b.py").write_text("import numpy\n")
    found = edges(tmp_path)
    assert {(e.imported, e.line) for e in found} == {("experiments.wiring", 2), ("vidur.b", 3)}
    assert [str(e) for e in upward(found)] == ["vidur/a.py:2 vidur -> experiments.wiring (experiments)"]


def test_layer_order():
    assert layer_of("block.engine.config") == "block"
    assert layer_of("block.policies.block") == "block.policies"
    assert layer_of("block.deploy.tasks") == "block.deploy"
    assert layer_of("numpy") is None
    assert "experiments" not in MAY_IMPORT["block"] and "block" not in MAY_IMPORT["vidur"]


if __name__ == "__main__":
    found = upward(edges())
    for e in found:
        print(e)
    print(f"{len(found)} upward edge(s)")
    sys.exit(1 if found else 0)
