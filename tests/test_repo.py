"""The project's own contract: CI runs exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    cmds = readme_commands()
    assert len(cmds) == 2 and cmds[0].endswith("just demo") and cmds[1].endswith("just test")
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [cmds[1]]


def test_no_comment_help_or_readme_line_cites_a_document_outside_the_repo():
    """What the code relies on is said here, in the project's own words: no pointer to the team's notes."""
    files = [*ROOT.glob("semievol_local/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md",
             ROOT / "justfile"]
    outside = ("FACTS", "PAPER.md", "STYLE.md", "shared/docs")
    me = Path(__file__).resolve()
    hits = [f"{p.name}:{i}" for p in files if p.resolve() != me
            for i, line in enumerate(p.read_text().splitlines(), 1) if any(o in line for o in outside)]
    assert not hits, hits


def test_readme_is_short_and_every_link_in_it_and_the_docs_resolves():
    import re

    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    for page in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: link to {target}, which does not exist"


# The packages from the ground up: each may import itself and those before it, except that `engines` and
# `training` never import each other (semievol_local/__init__.py says so to a reader).
LAYERS = ["core", "engines", "training", "method", "bench", "cli"]


def _import_graph() -> dict[str, set[str]]:
    """module -> modules of the package it imports (dotted, under semievol_local), counting the imports made
    inside functions too."""
    import ast

    pkg = ROOT / "semievol_local"
    graph: dict[str, set[str]] = {}
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg).with_suffix("")
        own = list(rel.parts[:-1])
        mod = ".".join(p for p in rel.parts if p != "__init__") or "__init__"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = own[:len(own) - (node.level - 1)]
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    target = ".".join(base + name.split("."))
                    path = pkg / target.replace(".", "/")
                    if path.with_suffix(".py").exists() or path.is_dir():
                        graph.setdefault(mod, set()).add(target)
    return graph


def test_imports_run_one_way():
    """No cycle among the package's modules, and every import goes down the layers."""
    graph = _import_graph()
    seen, cycles = set(), []

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen.add(node)

    for m in sorted(graph):
        visit(m, [m])
    assert not cycles, cycles
    assert len(graph) > 30  # the walk read the package
    pkg = ROOT / "semievol_local"
    top = {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == set(LAYERS), top
    assert not [p.name for p in pkg.glob("*.py") if p.name != "__init__.py"], "a module outside the packages"
    upward = []
    for mod, targets in graph.items():
        a = mod.split(".")[0]
        for t in targets:
            b = t.split(".")[0]
            if a in LAYERS and b in LAYERS and a != b:
                if LAYERS.index(b) > LAYERS.index(a) or {a, b} == {"engines", "training"}:
                    upward.append(f"{mod} -> {t}")
    assert not upward, upward


def test_only_the_engines_package_names_an_engine():
    """Stages, bench, training and cli reach llama.cpp and the llama-servers through `engines.protocol` (its
    `load`, `InferenceEngine`, `Score`, `Sample`): no module outside `engines` imports either implementation."""
    import ast

    concrete = {"llama_engine", "server_engine"}
    found, read = [], 0
    for f in (ROOT / "semievol_local").rglob("*.py"):
        if f.parent.name == "engines":
            continue
        read += 1
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if concrete & set(parts) or (parts[-1] == "engines" and concrete & {a.name for a in node.names}):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Import):
                if any(concrete & set(a.name.split(".")) for a in node.names):
                    found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert read > 40 and not found, found
