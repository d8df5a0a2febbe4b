"""The layout's rules, read from the source with `ast` (every import, also those inside
functions and under TYPE_CHECKING):

- no import cycle among the project's modules;
- apps import one way: billing -> transfers -> portal; no app imports the project package
  `relay`, and the desktop uploader `relay_client` imports none of the server's packages;
- inside an app, views and urls are imported only by urls (views -> services -> models), and
  models import nothing but models;
- in transfers, the study core (models, ingest, access, reports, purge, deliveries, ...) imports
  no feature package (sharing, patient_links, viewer, dicom, media, reconcile); only the modules
  that compose them do (apps, urls, completion, tasks, management commands);
- every task a service queues by name (`task_queue_on_commit`) is a registered Celery task.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "portal", "transfers", "billing", "relay_client")
APPS = ("portal", "transfers", "billing")
# What each app may import of the others (project -> apps, billing -> transfers -> portal).
ALLOWED_APPS = {
    "portal": {"portal"},
    "transfers": {"transfers", "portal"},
    "billing": {"billing", "transfers", "portal"},
    "relay_client": {"relay_client"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                modules[_module_name(path)] = path
    return modules


def _imported(name: str, path: Path, tree: ast.AST) -> Iterable[str]:
    """Every dotted name this module imports, with `from X import y` as both X and X.y."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (the deepest one each import names)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for dotted in _imported(name, path, ast.parse(path.read_text(), str(path))):
            while dotted and dotted not in modules:
                dotted = dotted.rpartition(".")[0]
            if dotted and dotted != name:
                targets.add(dotted)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(project_modules())


def test_the_cycle_finder_finds_a_cycle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_there_is_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    described = [
        " -> ".join(component)
        + "; edges: "
        + ", ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component)
        for component in found
    ]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_apps_import_one_way(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, targets in graph.items():
        app = module.split(".")[0]
        if app == "relay":
            continue  # the project package may import every app
        for target in targets:
            if target.split(".")[0] not in ALLOWED_APPS[app]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against billing -> transfers -> portal:\n" + "\n".join(wrong)


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def test_views_and_urls_are_imported_only_by_urls(graph: dict[str, set[str]]) -> None:
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _kind(target) in ("views", "urls") and _kind(module) != "urls"
    ]
    assert not wrong, "only urls import views:\n" + "\n".join(wrong)


def test_models_import_only_models(graph: dict[str, set[str]]) -> None:
    def is_models(module: str) -> bool:
        return ".models" in f".{module}" and module.split(".")[0] in APPS

    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if is_models(module)
        for target in targets
        if not is_models(target)
    ]
    assert not wrong, "models import only models:\n" + "\n".join(wrong)


FEATURES = (
    "sharing",
    "patient_links",
    "guest_links",
    "viewer",
    "dicom",
    "media",
    "reconcile",
    "dicomweb",
    "ohif",
    "deidentify",
)
# The study core's modules that sit above the features and compose them: the app's registry of
# tasks, its URLs, completion (a complete study is rendered, routed and its shares notified) and
# the beat tasks that call it, and the management commands.
COMPOSERS = ("transfers.apps", "transfers.urls", "transfers.completion", "transfers.tasks")


def _feature(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "transfers" and len(parts) > 1 and parts[1] in FEATURES else None


def test_the_study_core_imports_no_feature(graph: dict[str, set[str]]) -> None:
    core = [
        module
        for module in graph
        if module.split(".")[0] == "transfers"
        and _feature(module) is None
        and module not in COMPOSERS
        and not module.startswith("transfers.management")
    ]
    wrong = [
        f"{module} -> {target}" for module in core for target in graph[module] if _feature(target)
    ]
    assert not wrong, "the study core imports a feature package:\n" + "\n".join(wrong)


def _queued_task_names(modules: dict[str, Path]) -> dict[str, str]:
    """The literal task names passed to task_queue_on_commit, with where each is queued."""
    names = {}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "task_queue_on_commit"
            ):
                first = node.args[0] if node.args else None
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                    f"{module}:{node.lineno} names its task with a literal"
                )
                names[first.value] = f"{module}:{node.lineno}"
    return names


def test_every_task_queued_by_name_is_registered() -> None:
    from relay.celery import app

    queued = _queued_task_names(project_modules())
    assert len(queued) >= 5  # share e-mail, push, disc image, reconcile, purge
    missing = {name: where for name, where in queued.items() if name not in app.tasks}
    assert not missing, f"queued but not registered: {missing}"
