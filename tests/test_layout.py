"""The layout's rules, checked on the source:

- the dependency rule, on the source text (so code in a string counts too): ``streams/`` and ``trainer/`` never
  import each other, ``schemas/`` imports nothing of ours outside itself, and only the composition root ``tier3/``
  imports both sides; no import cycles;
- one writer of ``training-runs`` (``trainer/events.py``);
- no code strings that import (``python -c``), no ``importlib`` for our own modules, one command line (``tier3``);
- no two modules share a name for different things (nor a standard library module's name); module sizes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"schemas": ("streams", "trainer", "tier3"), "streams": ("trainer", "tier3"),
             "trainer": ("streams", "tier3")}


def _imports_of(package: str, others: tuple[str, ...]) -> list[str]:
    pattern = re.compile(rf"\b(?:from|import)\s+({'|'.join(others)})\b")
    return [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sorted((ROOT / package).rglob("*.py"))
            for m in pattern.finditer(p.read_text())]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_rule_allows(package: str) -> None:
    assert _imports_of(package, FORBIDDEN[package]) == []


def test_the_rule_check_sees_imports_and_the_composition_root_uses_both() -> None:
    found = _imports_of("tier3", ("streams", "trainer"))
    assert any("streams" in f for f in found) and any("trainer" in f for f in found), found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (function-level imports count too)."""
    mods: dict[str, Path] = {}
    for package in ("schemas", "streams", "trainer", "tier3"):
        for p in (ROOT / package).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [ours(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [ours(f"{node.module}.{a.name}") or ours(node.module) for a in node.names]
            graph[m].update(t for t in targets if t and t != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert "trainer.close_loop.gate" in graph and "trainer.events" in graph["trainer.close_loop.gate"]
    assert _cycles(graph) == []
    # the check finds one when there is one
    assert _cycles({**graph, "trainer.events": graph["trainer.events"] | {"trainer.close_loop.gate"}})


PACKAGES = ("schemas", "streams", "trainer", "tier3")


def _sources(*folders: str) -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for folder in folders
            for p in sorted((ROOT / folder).rglob("*.py"))}


# one writer of training-runs

#: the methods that write records: confluent-kafka's Producer, aiokafka's and Faust's topics
_WRITES = {"produce", "send", "send_and_wait", "send_soon", "send_batch", "produce_and_wait"}
_RUNS_TOPIC = "training_runs_topic"


def _is_runs_topic(node: ast.AST, tainted: set[str]) -> bool:
    """``settings.training_runs_topic``, or a name / ``self.`` attribute that was given it."""
    if isinstance(node, ast.Attribute):
        return node.attr == _RUNS_TOPIC or (isinstance(node.value, ast.Name) and node.value.id == "self"
                                           and f"self.{node.attr}" in tainted)
    return isinstance(node, ast.Name) and node.id in tainted


def _target_key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return f"self.{node.attr}"
    return None


def _call_args(call: ast.Call) -> list[ast.expr]:
    return [*call.args, *(k.value for k in call.keywords)]


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def training_runs_writes(tree: ast.Module) -> list[int]:
    """The lines of ``tree`` that write a record to training-runs: a write call (:data:`_WRITES`) whose topic is
    ``training_runs_topic``: directly, through a name or ``self.`` attribute given it, on a Faust topic made from it
    (``app.topic(...).send``), or through a function of the module that passes its parameter on as a write's topic
    (``self._send(self.topic, ...)``)."""
    tainted: set[str] = set()
    for _ in range(3):  # names given names given the topic
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                value = node.value
                made = (isinstance(value, ast.Call) and _callee(value) == "topic"
                        and any(_is_runs_topic(a, tainted) for a in _call_args(value)))
                if _is_runs_topic(value, tainted) or made:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    tainted.update(k for t in targets if (k := _target_key(t)))
    forwarding: set[str] = set()  # functions of this module that write to the topic their parameter names
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            params = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and _callee(call) in _WRITES and any(
                        isinstance(a, ast.Name) and a.id in params for a in _call_args(call)[:2]):
                    forwarding.add(fn.name)
    lines = set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and (_callee(call) in _WRITES or _callee(call) in forwarding):
            receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
            if any(_is_runs_topic(a, tainted) for a in _call_args(call)) or (
                    receiver is not None and _callee(call) in _WRITES and _is_runs_topic(receiver, tainted)):
                lines.add(call.lineno)
    return sorted(lines)


def test_one_writer_of_training_runs() -> None:
    """Only ``trainer/events.py`` (``TrainerEvents``) writes training-runs: the trainer's lifecycle events, the close
    loop's, ``tier3 promote`` / ``rollback`` and the watcher's rollbacks all go through it."""
    writers = {path: lines for path, tree in _sources(*PACKAGES, "bench", "examples").items()
               if (lines := training_runs_writes(tree))}
    assert list(writers) == ["trainer/events.py"], writers


def test_the_writer_check_sees_writes() -> None:
    direct = ast.parse("def f(p, s):\n    p.produce(s.training_runs_topic, value=b'')\n")
    named = ast.parse("def f(p, s):\n    t = s.training_runs_topic\n    p.produce(topic=t, value=b'')\n")
    faust = ast.parse("ch = app.topic(settings.training_runs_topic)\nasync def f():\n    await ch.send(value=1)\n")
    other = ast.parse("def f(p, s):\n    p.produce(s.traces_topic, value=b'')\n    s.training_runs_topic\n")
    assert training_runs_writes(direct) == [2] and training_runs_writes(named) == [3]
    assert training_runs_writes(faust) == [3] and training_runs_writes(other) == []


# no code strings that import, no importlib for our own modules

def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _imports_in(text: str) -> bool:
    try:
        code = ast.parse(text)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(code))


def code_strings_with_imports(tree: ast.Module) -> list[int]:
    """Lines of string constants (docstrings aside) that are Python code importing something: code run through
    ``python -c`` or ``exec``, which the import graph and the dependency rule would not see."""
    docs = _docstrings(tree)
    return sorted(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and id(n) not in docs and _imports_in(n.value))


def test_no_code_strings_that_import() -> None:
    found = {path: lines for path, tree in _sources(*PACKAGES, "bench", "examples").items()
             if (lines := code_strings_with_imports(tree))}
    assert found == {}
    # the check finds one when there is one
    assert code_strings_with_imports(ast.parse('RUN = "import sys; from x import y; sys.exit(y())"\n')) == [1]
    assert code_strings_with_imports(ast.parse('"""A docstring.\n\n    from x import y\n"""\n')) == []


def test_no_importlib_for_our_modules() -> None:
    """Our modules are imported by name (``import``/``from``), never through ``importlib.import_module`` or
    ``__import__``: the import graph (and the checks above) see every dependency. Optional third-party packages
    may still be looked for (``importlib.util.find_spec``)."""
    found = [f"{path}:{n.lineno}" for path, tree in _sources(*PACKAGES).items() for n in ast.walk(tree)
             if isinstance(n, ast.Call) and _callee(n) in ("import_module", "__import__")]
    assert found == []


# one command line

def test_one_command_line() -> None:
    """``tier3`` (``tier3/__main__.py``, the installed script) is the one command line; the other modules run with
    ``python -m`` are internal and say so."""
    internal = {"schemas/write_json_schemas.py", "trainer/close_loop/gguf_converter.py",
                "trainer/close_loop/llama_server.py"}
    mains = set()
    for path, tree in _sources(*PACKAGES).items():
        for n in tree.body:
            if isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name) \
                    and n.test.left.id == "__name__":
                mains.add(path)
    assert mains <= internal, mains - internal
    for path in internal:
        assert "internal" in (ast.get_docstring(ast.parse((ROOT / path).read_text())) or ""), path


# names and sizes

#: module names several packages share for the same kind of thing (each package's command line, settings,
#: exception root; streams/redaction.py is the streams side's name for schemas/runtime/redaction.py)
SHARED_NAMES = {"__init__", "cli", "errors", "settings", "redaction"}


def test_no_two_modules_share_a_name_for_different_things() -> None:
    import sys
    from collections import defaultdict

    by_name: dict[str, list[str]] = defaultdict(list)
    for package in PACKAGES:
        for p in (ROOT / package).rglob("*.py"):
            by_name[p.stem].append(str(p.relative_to(ROOT)))
    shared = {name for name, paths in by_name.items() if len(paths) > 1}
    assert shared <= SHARED_NAMES, {n: by_name[n] for n in shared - SHARED_NAMES}
    assert sorted(n for n in by_name if n in sys.stdlib_module_names) == []


#: a module over this many lines is split (by what its parts are), unless listed below
MAX_MODULE_LINES = 600
#: today's exceptions, each with its ceiling: they may shrink, not grow
LARGER_MODULES = {
    "trainer/sft_trainer.py": 760,  # two training backends (TRL + PEFT, unsloth) sharing one SFT setup
}


def test_module_sizes() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    too_big = {path: n for path, n in sizes.items() if n > LARGER_MODULES.get(path, MAX_MODULE_LINES)}
    assert too_big == {}, f"split these modules (limit {MAX_MODULE_LINES} lines): {too_big}"
    stale = {path: sizes.get(path) for path, limit in LARGER_MODULES.items()
             if sizes.get(path, 0) <= MAX_MODULE_LINES}
    assert stale == {}, f"no longer over the limit: drop them from LARGER_MODULES: {stale}"
