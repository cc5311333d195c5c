"""What ``make test-systemd`` boots and installs: the freshly built .deb, the wheels for the pip
variant, and the debootstrapped bookworm root, cached in /var/cache/forwarder-test-systemd.

Cache entries are keyed on what they hold (the root on suite, mirror and package list; the wheels
on the requirements and this venv's frozen versions) and built once, under an exclusive lock on
the cache; a run holds a shared lock on its root while the container runs over it, so a run that
needs another package list never deletes a root in use. Not here: booting it (nspawn.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT, host, say

SUITE = "bookworm"  # the package is built for its python3 (3.11)
ROOT_LAYOUT = 1  # bump when the root's preparation in build_root changes
CACHE = Path(os.environ.get("FORWARDER_TEST_SYSTEMD_CACHE", "/var/cache/forwarder-test-systemd"))


# --- the cached root ---------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    configured = os.environ.get("FORWARDER_TEST_SYSTEMD_MIRROR")
    if configured:
        return configured
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                for uri in fields.get("URIs", "").split():
                    if SUITE in suites and uri.rstrip("/").endswith("/debian"):
                        return uri
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def deb_depends(deb: Path) -> list[str]:
    depends = host(["dpkg-deb", "-f", str(deb), "Depends"]).strip()
    names = {re.split(r"[\s(:]", alt.split("|")[0].strip())[0] for alt in depends.split(",")}
    return sorted(n for n in names if n)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """The whole cache, exclusively: building, choosing and pruning its entries."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Anything half-built here was left by a run that was killed while holding this lock.
        for stale in [*CACHE.glob(".building-*"), *CACHE.glob(".wheels-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        yield


def cached_root(packages: list[str], stack: contextlib.ExitStack) -> Path:
    """The debootstrapped root for ``packages``, built once. A shared lock on it is held until
    ``stack`` closes, so that a run needing another package list never deletes it in use."""
    mirror = apt_mirror()
    key_text = json.dumps([SUITE, mirror, packages, ROOT_LAYOUT])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    root = CACHE / f"root-{key}"
    with cache_lock():
        if (root / ".complete").exists():
            say(f"root: cached {root}")
        else:
            build_root(root, packages, mirror, key_text)
        in_use = stack.enter_context(open(CACHE / f"root-{key}.lock", "a"))  # noqa: SIM115
        fcntl.flock(in_use, fcntl.LOCK_SH)
        for old in CACHE.glob("root-*"):
            if old.suffix == ".lock" or old == root:
                continue
            with open(old.with_name(old.name + ".lock"), "a") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another run boots it right now
                say(f"root: removing the outdated {old}")
                shutil.rmtree(old, ignore_errors=True)
                old.with_name(old.name + ".lock").unlink(missing_ok=True)
    return root


def build_root(root: Path, packages: list[str], mirror: str, key_text: str) -> None:
    say(f"root: debootstrap {SUITE} from {mirror} with {','.join(packages)} (once)")
    work = CACHE / f".building-{root.name}"
    try:
        host(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                SUITE,
                str(work),
                mirror,
            ],
            timeout=900,
        )
        shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
        (work / "var/cache/apt/archives/partial").mkdir(parents=True)
        # No getty on the console: the container's console is our log file.
        (work / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
        # The man-db trigger would only slow dpkg -i down.
        (work / "var/lib/man-db/auto-update").unlink(missing_ok=True)
        (work / ".complete").write_text(key_text + "\n")
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"root: cached as {root}")


# --- the .deb and the wheels -------------------------------------------------------------


def build_artifacts(share: Path, with_wheels: bool) -> Path:
    say("build: packaging/build-deb.sh (the freshly built .deb)")
    env = dict(os.environ, OUT_DIR=str(share / "dist"), PYTHON=sys.executable)
    out = host(["bash", str(ROOT / "packaging/build-deb.sh")], env=env).strip().splitlines()[-1]
    deb = share / "forwarder.deb"
    shutil.move(out, deb)
    shutil.rmtree(share / "dist")
    if with_wheels:
        say("build: the forwarder wheel, and its dependencies' wheels (downloaded once, cached)")
        wheels = share / "wheels"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        host([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)])
        dependency_wheels(pip, wheels)
    return deb


def dependency_wheels(pip: list[str], into: Path) -> None:
    """The wheels of forwarder's dependencies at the versions of this venv (pip freeze),
    downloaded once into the cache and copied ``into``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    frozen = host([*pip, "freeze", "--exclude-editable"]).splitlines()
    constraints = [line for line in frozen if not re.match(r"(?i)^forwarder[ =@]", line)]
    key_text = json.dumps([requirements, constraints, sys.version_info[:2]])
    folder = CACHE / f"wheels-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}"
    with cache_lock():
        if not (folder / ".complete").exists():
            download_wheels(pip, folder, requirements, constraints, key_text)
        for old in CACHE.glob("wheels-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        for wheel in folder.glob("*.whl"):  # copied under the lock: never pruned mid-copy
            shutil.copy(wheel, into / wheel.name)


def download_wheels(
    pip: list[str], folder: Path, requirements: list[str], constraints: list[str], key_text: str
) -> None:
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".wheels-"))
    try:
        (work / "constraints.txt").write_text("\n".join(constraints) + "\n")
        host(
            [
                *pip,
                "download",
                "--only-binary=:all:",
                "-d",
                str(work),
                "-c",
                str(work / "constraints.txt"),
                *requirements,
            ]
        )
        (work / ".complete").write_text(key_text)
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
