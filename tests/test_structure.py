"""The design in docs/architecture.md, held against the code: every module is in it, the registry is the only
place that knows the analyses (the viewer and the report name none, analyses.py imports none), and the imports
between analyses only shrink."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from convscope import analyses

SRC = Path(analyses.__file__).parent
DOC = SRC.parents[1] / "docs" / "architecture.md"


def _imports(path: Path) -> set[str]:
    """The convscope modules a file imports (relative imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found


def _strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a Python file other than its docstrings, with their lines."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


ANALYSIS_MODULES = {a.compute.__module__.rsplit(".", 1)[-1] for a in analyses.REGISTRY if a.compute} | {"ablation"}


def test_every_module_is_in_the_architecture_document():
    text = DOC.read_text()
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        named = rel.removesuffix("__init__.py") if rel.endswith("/__init__.py") else rel
        if f"`{named}`" not in text:
            missing.append(named)
    assert not missing, f"add these modules to docs/architecture.md: {missing}"
    for module in ANALYSIS_MODULES:  # and each analysis with its key
        key = next(a.key for a in analyses.REGISTRY if (a.compute and a.compute.__module__.endswith("." + module))
                   or (module == "ablation" and a.key == "table3"))
        assert re.search(rf"`{module}\.py` \| `{key}`", text), module


def test_the_viewer_and_the_report_name_no_analysis():
    words = {w for a in analyses.REGISTRY for w in (a.key, a.name)}
    assert {"fig2", "fig4", "fig7", "evolution", "visualize", "pointing"} <= words
    named = re.compile(r"\b(" + "|".join(map(re.escape, sorted(words))) + r")\b")
    found = []
    for package in ("viewer", "report"):
        for path in sorted((SRC / package).rglob("*")):
            if path.suffix == ".py":
                lines = _strings(path)
            elif path.suffix in (".html", ".js", ".css"):
                lines = list(enumerate(path.read_text().splitlines(), 1))
            else:
                continue
            found += [f"{path.relative_to(SRC)}:{n}: {named.search(s).group()}" for n, s in lines if named.search(s)]
    assert not found, "the viewer and the report take what they show from the registry: " + "; ".join(found)


def test_analyses_py_imports_no_analysis_and_analyses_import_each_other_less_and_less():
    assert not _imports(SRC / "analyses.py") & ANALYSIS_MODULES
    # Issue 26 moves what these share into modules of their own below the analyses; until then, none is added.
    standing = {("correspondence", "occlusion"), ("evolution", "units"), ("filters", "units"),
                ("invariance", "occlusion"), ("occlusion", "units"), ("pointing", "occlusion"),
                ("sanity", "occlusion"), ("transfer", "probes"), ("visualize", "units")}
    now = {(m, other) for m in ANALYSIS_MODULES for other in _imports(SRC / f"{m}.py") & ANALYSIS_MODULES
           if other != m}
    assert now <= standing, f"an analysis imports another: {sorted(now - standing)}"
    gone = standing - now
    assert not gone, f"{sorted(gone)} no longer import each other: take them off this list"


def test_a_word_of_an_analysis_in_the_viewer_is_caught(tmp_path, monkeypatch):
    """The check above can fail: a viewer source naming ``fig7`` is reported."""
    fake = tmp_path / "viewer"
    fake.mkdir()
    (fake / "__init__.py").write_text('"""doc fig7"""\nX = "/figures/fig7"\n')
    (fake / "page.html").write_text("<p>see evolution</p>\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    (tmp_path / "report").mkdir()
    try:
        test_the_viewer_and_the_report_name_no_analysis()
    except AssertionError as e:
        assert "viewer/__init__.py:2: fig7" in str(e) and "viewer/page.html:1: evolution" in str(e)
        assert "doc" not in str(e)
    else:
        raise AssertionError("a viewer naming fig7 passed")
