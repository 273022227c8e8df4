"""The layering holds: import-linter's contracts (pyproject.toml), no import cycle among the package's
modules (lazy imports inside functions included), the catalog matches what the modules register, and
no file or function outgrows the size that keeps it readable."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import leanlm
from leanlm.core import catalog, registry

SRC = Path(leanlm.__file__).parent
ROOT = SRC.parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the leanlm modules it imports anywhere in its file (top level or inside a function)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in known else base)
        graph[name] = {e for e in edges if e in known and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_linter_contracts_are_kept():
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 300  # the graph was really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_files_and_functions_stay_small():
    too_long = [f"{n}: {len(p.read_text().splitlines())} lines" for n, p in modules().items()
                if len(p.read_text().splitlines()) > 400]
    assert not too_long
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_functions


def test_catalog_matches_what_the_modules_register():
    for info in pkgutil.walk_packages(leanlm.__path__, "leanlm."):
        if info.name != "leanlm.__main__":
            importlib.import_module(info.name)
    steps, runtime_modules = registry.registered()
    assert set(steps) == set(catalog.STEPS)
    for name, entry in steps.items():
        defined_in = (entry.verb or entry.handler).__module__
        # a step's verb may be the family's public function defined beside its config
        assert catalog.STEPS[name] in (defined_in, entry.config.__module__), name
    assert set(runtime_modules) == set(catalog.RUNTIME_MODULES)
    assert all(cls.__module__ == catalog.RUNTIME_MODULES[s] for s, cls in runtime_modules.items())
    for name, path in catalog.COMMANDS.items():
        module = importlib.import_module(path)
        assert callable(module.add_parser) and callable(module.run), name


def test_a_step_type_imports_only_its_own_module():
    code = ("import sys; from leanlm.core.registry import step_type, runtime_module; step_type('rtn'); "
            "runtime_module('int8_weight_only'); "
            "print(sorted(m for m in sys.modules if m.startswith(('leanlm.sparsify', 'leanlm.prune', 'leanlm.distill'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_names_list_the_catalog():
    with pytest.raises(leanlm.errors.ConfigError, match="unknown step type 'gtpq' \\(did you mean 'gptq'\\?\\); step types: act_sparsity, awq"):
        registry.step_type("gtpq")
    with pytest.raises(leanlm.errors.UnsupportedModelError, match="unknown runtime module scheme 'int3'"):
        registry.runtime_module("int3")


def test_a_new_command_is_one_module_and_one_catalog_line(tmp_path, monkeypatch, capsys):
    """The docs' example: a nested command group (`leanlm hello say NAME`) added without touching the CLI."""
    (tmp_path / "hello_cmd.py").write_text(
        '"""`leanlm hello`: a greeting group."""\n'
        "from leanlm.cli.options import command\n\n"
        "def add_parser(sub):\n"
        "    group = command(sub, 'hello', 'greetings', 'Greetings.', run)\n"
        "    inner = group.add_subparsers(dest='action', required=True)\n"
        "    command(inner, 'say', 'say hello', 'Say hello to NAME.', say).add_argument('name')\n\n"
        "def run(args):\n    return 1\n\n"
        "def say(args):\n    print(f'hello {args.name}')\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(catalog.COMMANDS, "hello", "hello_cmd")
    from leanlm.cli import main

    assert main(["hello", "say", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"


def test_moved_names_still_import_with_a_warning():
    code = ("import warnings; warnings.simplefilter('error');\n"
            "try:\n    from leanlm.core.data import default_corpus\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from leanlm.core.data import calibration_samples; from leanlm.core.models import save_model, register_module\n"
            "from leanlm.prune import sparse24_; print(save_model.__module__, register_module.__module__, sparse24_.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "moved to leanlm.data.corpus.default_corpus" in out
    assert out.splitlines()[-1] == "leanlm.models.save leanlm.core.registry leanlm.sparsify.sparse24"
