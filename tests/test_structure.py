"""The design in docs/architecture.md, held against the code: every module is in it, the registry is the only
place that knows the analyses (the viewer and the report name none, analyses.py imports none), and no analysis
imports another."""

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


def _sections() -> dict[str, int]:
    """Each module of the document's module map (``units.py``, ``data/base.py``, ``report/``) -> the number of
    its section (Foundations 0, Data and models 1, ...)."""
    text = DOC.read_text().split("## From a command to files")[0].split("## The module map")[1]
    found, section = {}, -1
    for line in text.splitlines():
        if line.startswith("**"):
            section += 1
        for name in re.findall(r"`([\w/]+(?:\.py|/))`", line):
            found.setdefault(name, section)
    return found


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC).as_posix()
    return rel.removesuffix("__init__.py") if rel.endswith("/__init__.py") else rel


def test_imports_run_down_the_layers_of_the_document():
    """A module imports only modules of its own section of the map or of an earlier one."""
    sections = _sections()
    assert (sections["forward.py"] < sections["deconvnet.py"] < sections["run.py"] < sections["analyses.py"]
            < sections["units.py"] < sections["viewer/"] < sections["cli.py"])  # the map was read
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        here = _module_of(path)
        folder = path.parent.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = [] if folder == "." else folder.split("/")
            base = base[:len(base) - (node.level - 1)]
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            for name in names:
                target = "/".join([*base, name])
                module = f"{target}/" if (SRC / target).is_dir() else f"{target}.py"
                if module in sections and sections[module] > sections[here]:
                    wrong.append(f"{here} (section {sections[here]}) imports {module} (section {sections[module]})")
    assert not wrong, wrong


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


def test_no_analysis_imports_another_and_analyses_py_imports_none():
    """The analysis layer is flat: what analyses share (occluders, views, the readout) lives below them."""
    assert not _imports(SRC / "analyses.py") & ANALYSIS_MODULES
    now = {(m, other) for m in ANALYSIS_MODULES for other in _imports(SRC / f"{m}.py") & ANALYSIS_MODULES
           if other != m}
    assert not now, f"an analysis imports another: {sorted(now)}"


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


def test_the_papers_layer_names_are_read_in_one_place():
    """``paper_layers`` is declared by the built-in models and read by ``layers.paper_names`` alone; the rest asks
    the run (``run.paper_names``) or that function."""
    readers = sorted(_module_of(p) for p in SRC.rglob("*.py") if "paper_layers" in p.read_text()
                     and not _module_of(p).startswith("models/"))
    assert readers == ["layers.py"], readers


def test_the_engines_recognise_no_hook_by_its_class_or_name():
    """The engines ask ``forward.preprocessing`` what the inputs go through; none looks for a hook's class or name."""
    for name in ("deconvnet.py", "incremental.py", "receptive_field.py", "topk.py"):
        text = (SRC / name).read_text()
        for word in ("__qualname__", "Normalization", "on_device", "_forward_pre_hooks.values"):
            assert word not in text, (name, word)
