"""The package's layers, as README's development section draws them, checked on the source.

Every ``import`` and ``from … import`` in ``forwarder/`` (at module level or inside a function) is
read with :mod:`ast`; a module may import its own sub-package and the layers below it, never a
layer above or a sibling it does not depend on. The third-party libraries stay where STYLE.md
puts them, so that swapping one touches one corner of the tree.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "forwarder"

#: What each part of the package may import from forwarder (besides itself).
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},  # config, errors, logsetup, durations, urls, crashpoints, __init__, __main__
    "dicom": {"base"},
    "net": {"base", "dicom"},
    "queue": {"base"},  # plain values in, records out: no DICOM, no network
    "dicomweb": {"base", "dicom", "net"},  # STOW-RS: the same outcomes as net's C-STORE
    "daemon": {"base", "dicom", "net", "dicomweb", "queue"},
    "cli": {"base", "dicom", "net", "dicomweb", "queue", "daemon"},
    "conformance": {"base", "dicom", "net", "dicomweb", "queue", "daemon", "cli"},
}

#: Third-party libraries and the only places that may import them.
CONFINED: dict[str, set[str]] = {
    "watchdog": {"daemon/watcher.py", "daemon/watch_events.py"},
    "prometheus_client": {"daemon/metrics.py"},
    "systemd": {"daemon/notify.py", "logsetup.py"},
    "yaml": {"config/load.py"},
    "urllib3": {"dicomweb/*"},
    "pynetdicom": {"net/*", "conformance/*"},
    "dicomanonymizer": {"dicom/deidentify.py"},  # PS3.15 Annex E's table, nothing else
}


#: Sub-packages of the base layer (imported by all, importing none of the layers).
BASE_PACKAGES = {"config"}


def _part(module: str) -> str:
    """``forwarder.net.pdu`` -> ``net``; top-level modules are the ``base`` layer."""
    if module == "forwarder.__main__":
        return "cli"  # python -m forwarder: the command line's entry point
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED and parts[1] != "base":
        return parts[1]
    return "base"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "forwarder":  # from forwarder import net, __version__
                for alias in node.names:
                    yield node.lineno, f"forwarder.{alias.name}"
            else:
                yield node.lineno, node.module


def _name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    wrong: list[str] = []
    for path in _modules():
        own = _part(_name(path))
        for line, target in _imports(path):
            if target.split(".")[0] != "forwarder":
                continue
            theirs = _part(target)
            if theirs != own and theirs not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {own} imports {target} ({theirs})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize("library", sorted(CONFINED))
def test_third_party_libraries_stay_in_their_corner(library: str) -> None:
    places = CONFINED[library]
    wrong = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        allowed = rel in places or any(p.endswith("/*") and rel.startswith(p[:-1]) for p in places)
        for line, target in _imports(path):
            if target.split(".")[0] == library and not allowed:
                wrong.append(f"forwarder/{rel}:{line}: imports {target}")
    assert not wrong, f"{library} imported outside {sorted(places)}:\n" + "\n".join(wrong)


def test_the_layers_are_the_folders() -> None:
    """A new sub-package must be placed in the layering above, not slip past it."""
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(ALLOWED) - {"base"} | BASE_PACKAGES


def test_the_checker_sees_a_lazy_forbidden_import(tmp_path: Path) -> None:
    # The check must be able to fail: an import inside a function is found, and queue
    # importing the network layer is against the rules.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from forwarder.net import channel\n    import forwarder.dicom\n"
    )
    assert list(_imports(probe)) == [(2, "forwarder.net"), (3, "forwarder.dicom")]
    assert _part("forwarder.net.channel") == "net"
    assert _part("forwarder.config") == "base"
    assert "net" not in ALLOWED["queue"]
