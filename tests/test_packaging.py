"""The systemd unit, sysusers/tmpfiles entries, default config, dashboards and the .deb.

The package is built once per test module with the real ``packaging/build-deb.sh`` (its
dependency tree is cached in build/deb-cache, so a rebuild takes seconds), inspected with
dpkg-deb, and installed with dpkg into a throw-away root: an overlay of / on a tmpfs in a
private mount namespace, so the host's dpkg database, users and /usr stay untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from forwarder import __version__
from forwarder.config import load_config
from forwarder.daemon.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "forwarder.service"
DEBIAN_PYTHON = Path("/usr/bin/python3")


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=cwd
    )


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# --- the unit ------------------------------------------------------------------------------


def test_unit_has_the_required_directives() -> None:
    s = _unit_settings()

    def one(key: str) -> str:
        assert key in s, f"{key} missing from {UNIT.name}"
        return s[key][-1]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.ExecStart") == "/usr/bin/forwarder run -c /etc/forwarder/forwarder.yaml"
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one("Service.ExecReload"))
    assert one("Service.Restart") == "on-failure"
    assert "78" in one("Service.RestartPreventExitStatus").split()
    assert re.fullmatch(r"\d+(s|min)", one("Service.WatchdogSec"))
    assert one("Service.User") == "forwarder"
    assert one("Service.Group") == "forwarder"
    assert one("Service.StateDirectory") == "forwarder"
    assert one("Service.ReadWritePaths").split() == ["/var/spool/forwarder"]
    assert one("Service.ProtectSystem") == "strict"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert one(f"Service.{key}") == "yes", key
    assert one("Service.CapabilityBoundingSet") == ""
    assert set(one("Service.RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in s["Service.SystemCallFilter"]
    assert one("Install.WantedBy") == "multi-user.target"


def test_unit_parses_without_unknown_settings() -> None:
    analyze = _need("systemd-analyze")
    result = _run([analyze, "verify", str(UNIT)])
    # /usr/bin/forwarder and its man page are not installed here; those complaints are fine.
    bad = [
        line
        for line in result.stderr.splitlines()
        if re.search(r"Unknown (key|section)|Failed to parse|Invalid|Missing|unit file", line)
    ]
    assert not bad, result.stderr


def test_unit_security_exposure_at_most_2() -> None:
    analyze = _need("systemd-analyze")
    result = _run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)])
    match = re.search(r"Overall exposure level for forwarder\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_sysusers_and_tmpfiles_create_user_and_folders(tmp_path: Path) -> None:
    sysusers, tmpfiles = _need("systemd-sysusers"), _need("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    for kind, src in (("sysusers.d", "forwarder.sysusers"), ("tmpfiles.d", "forwarder.tmpfiles")):
        (tmp_path / "usr/lib" / kind).mkdir(parents=True)
        shutil.copy(PACKAGING / src, tmp_path / "usr/lib" / kind / "forwarder.conf")
    result = _run([sysusers, f"--root={tmp_path}", "forwarder.conf"])
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    user = re.search(r"^forwarder:x:(\d+):(\d+):[^:]*:/var/lib/forwarder:(\S+)$", passwd, re.M)
    assert user, passwd
    assert user.group(3).endswith("nologin")
    result = _run([tmpfiles, f"--root={tmp_path}", "--create", "forwarder.conf"])
    assert result.returncode == 0, result.stderr
    modes = {
        "var/spool/forwarder": 0o750,
        "var/spool/forwarder/incoming": 0o2770,
        "var/spool/forwarder/done": 0o750,
        "var/spool/forwarder/failed": 0o750,
        "var/lib/forwarder": 0o750,
    }
    for rel, mode in modes.items():
        st = (tmp_path / rel).stat()
        assert oct(st.st_mode & 0o7777) == oct(mode), rel
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (int(user.group(1)), int(user.group(2))), rel


# --- the packaged config, dashboard and alerts ------------------------------------------


def test_packaged_config_is_valid_and_fits_the_sandbox() -> None:
    config = load_config(PACKAGING / "forwarder.yaml")
    assert [(d.host, d.port) for d in config.destinations] == [("127.0.0.1", 11112)]
    assert config.metrics is not None and config.metrics.listen == "127.0.0.1:9750"
    writable = [Path(p) for p in _unit_settings()["Service.ReadWritePaths"][-1].split()]
    writable.append(Path("/var/lib") / _unit_settings()["Service.StateDirectory"][-1])
    for folder in (config.incoming, config.done, config.failed, config.queue.parent):
        assert any(folder.is_relative_to(w) for w in writable), folder
    tmpfiles = (PACKAGING / "forwarder.tmpfiles").read_text()
    for folder in (config.incoming, config.done, config.failed, config.queue.parent):
        assert re.search(rf"^d\s+{re.escape(str(folder))}\s", tmpfiles, re.M), folder


def _exposed_metric_names(tmp_path: Path) -> set[str]:
    class Counts:
        pending = in_flight = done = failed = 0
        oldest_pending_seconds = None

    metrics = Metrics(destinations=["pacs"])
    metrics.set_queue_source(lambda: {"pacs": Counts()})
    metrics.set_failed_folder(tmp_path)
    metrics.ingested(False, "not_dicom")
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def _promql_expressions() -> list[str]:
    alerts = yaml.safe_load((PACKAGING / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    dashboard = json.loads((PACKAGING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    return exprs


def test_alerts_and_dashboard_use_only_exposed_metrics(tmp_path: Path) -> None:
    exposed = _exposed_metric_names(tmp_path)
    alerts = yaml.safe_load((PACKAGING / "alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    for wanted in (
        "ForwarderDestinationFailing",
        "ForwarderQueueGrowing",
        "ForwarderOldestPendingOverAnHour",
        "ForwarderFilesInFailed",
    ):
        assert wanted in names
    used = set()
    for expr in _promql_expressions():
        used.update(re.findall(r"\bforwarder_[a-z_]+", expr))
    assert used
    assert used <= exposed, f"not exposed by forwarder.daemon.metrics: {sorted(used - exposed)}"


def test_promql_parses(tmp_path: Path) -> None:
    import promql_parser  # a dev dependency: CI skips nothing

    for expr in _promql_expressions():
        promql_parser.parse(expr.replace("$__rate_interval", "5m"))


# --- the .deb --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("dpkg-deb")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OUT_DIR=str(out), PYTHON=sys.executable)
    result = _run(["bash", str(PACKAGING / "build-deb.sh")], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    path = out / f"forwarder_{__version__}_{arch}.deb"
    assert result.stdout.strip().splitlines()[-1] == str(path)
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    result = _run(["dpkg-deb", "-x", str(deb), str(root)])
    assert result.returncode == 0, result.stderr
    return root


def test_rebuild_is_quick(deb: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable)
    started = time.monotonic()
    result = _run(["bash", str(PACKAGING / "build-deb.sh")], env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60


def test_deb_control_conffiles_and_scripts(deb: Path, tmp_path: Path) -> None:
    info = _run(["dpkg-deb", "-I", str(deb)]).stdout
    field = dict(re.findall(r"^ ([A-Z][A-Za-z-]+): (.*)$", info, re.M))
    assert field["Package"] == "forwarder"
    assert field["Version"] == __version__
    assert field["Architecture"] == _run(["dpkg", "--print-architecture"]).stdout.strip()
    depends = field["Depends"]
    assert re.search(r"python3 \(>= 3\.11~\), python3 \(<< 3\.12\)", depends)
    assert "python3-systemd" in depends
    assert int(field["Installed-Size"]) > 1000

    control = tmp_path / "DEBIAN"
    assert _run(["dpkg-deb", "-e", str(deb), str(control)]).returncode == 0
    assert (control / "conffiles").read_text().split() == ["/etc/forwarder/forwarder.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        assert os.access(control / script, os.X_OK), script
        assert (control / script).read_bytes() == (PACKAGING / "deb" / script).read_bytes()
    postinst = (control / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles --create" in postinst
    assert "/run/systemd/system" in postinst  # enable/start only on a running systemd
    md5sums = (control / "md5sums").read_text()
    assert re.search(r"^[0-9a-f]{32}  usr/bin/forwarder$", md5sums, re.M)


def test_deb_depends_on_what_the_unit_executes(deb: Path, extracted: Path) -> None:
    # Every program the unit runs is in the package or in a package it depends on: a minimal
    # Debian root (debootstrap minbase) has no /bin/kill, so without procps `systemctl reload
    # forwarder` failed with 203/EXEC (found by make test-systemd).
    _need("dpkg-query")
    info = _run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    depends = {re.split(r"[\s(]", alt.strip())[0] for alt in info.split(",")}
    programs = set()
    for key, values in _unit_settings().items():
        if key.startswith("Service.Exec"):
            programs.update(v.lstrip("-@:+!").split()[0] for v in values if v)
    assert "/bin/kill" in programs
    for program in sorted(programs):
        if (extracted / program.lstrip("/")).exists():
            continue
        owner = _run(["dpkg-query", "-S", program])
        if owner.returncode != 0:
            pytest.skip(f"{program} is not installed on this host: cannot tell its package")
        package = owner.stdout.split(":")[0]
        assert package in depends, f"{program} comes from {package}, not in Depends: {info}"


def test_deb_files(deb: Path, extracted: Path) -> None:
    listing = _run(["dpkg-deb", "-c", str(deb)]).stdout
    entries = {}
    for line in listing.splitlines():
        parts = line.split()
        entries[parts[5].removeprefix(".")] = (parts[0], parts[1])
    expected = {
        "/usr/bin/forwarder": "-rwxr-xr-x",
        "/etc/forwarder/forwarder.yaml": "-rw-r--r--",
        "/lib/systemd/system/forwarder.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/forwarder.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/forwarder.conf": "-rw-r--r--",
        "/usr/share/man/man1/forwarder.1.gz": "-rw-r--r--",
        "/usr/share/doc/forwarder/copyright": "-rw-r--r--",
        "/usr/share/doc/forwarder/README.md": "-rw-r--r--",
        "/usr/share/doc/forwarder/examples/alerts.yml": "-rw-r--r--",
        "/usr/share/doc/forwarder/examples/grafana-dashboard.json": "-rw-r--r--",
        "/usr/lib/forwarder/forwarder/cli/__init__.py": "-rw-r--r--",
        "/usr/lib/forwarder/forwarder/daemon/notify.py": "-rw-r--r--",
        # deidentify's option columns (PS3.15 Table E.1-1), read at run time
        "/usr/lib/forwarder/forwarder/dicom/data/confidentiality_profile.json": "-rw-r--r--",
        "/usr/lib/forwarder/forwarder/dicom/data/safe_private_attributes.json": "-rw-r--r--",
        "/usr/lib/forwarder/forwarder/dicom/data/README.md": "-rw-r--r--",
    }
    for path, mode in expected.items():
        assert path in entries, path
        assert entries[path] == (mode, "root/root"), path
    bundled = {p.split("/")[4] for p in entries if p.startswith("/usr/lib/forwarder/")}
    for package in ("pynetdicom", "pydicom", "pydantic", "pydantic_core", "numpy", "yaml"):
        assert package in bundled, package
    assert "bin" not in bundled  # the build venv's console scripts are not shipped

    root = extracted
    assert (root / "etc/forwarder/forwarder.yaml").read_bytes() == (
        PACKAGING / "forwarder.yaml"
    ).read_bytes()
    if shutil.which("groff") and shutil.which("gzip"):
        page = subprocess.run(
            ["gzip", "-dc", str(root / "usr/share/man/man1/forwarder.1.gz")],
            capture_output=True,
            check=True,
        ).stdout
        render = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, check=False
        )
        assert render.returncode == 0 and not render.stderr, render.stderr.decode()
        assert b".SH EXIT STATUS" in page and b"78" in page


def test_extracted_program_runs_on_debian_python(extracted: Path) -> None:
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (Debian's python3)")
    version = _run([str(DEBIAN_PYTHON), "-c", "import sys; print(sys.version_info[:2])"])
    if version.stdout.strip() != "(3, 11)":
        pytest.skip(f"/usr/bin/python3 is {version.stdout.strip()}, the package is for 3.11")
    root = extracted
    # The wrapper finds ../lib/forwarder relative to itself, so it runs from here too.
    result = _run([str(DEBIAN_PYTHON), str(root / "usr/bin/forwarder"), "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"forwarder {__version__}"
    # Compiled dependencies load in Debian's interpreter, and the conffile validates.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import numpy, pydantic_core, pynetdicom, pydicom, yaml, watchdog.observers;"
        "import prometheus_client, pylibjpeg, forwarder.daemon.metrics, forwarder.logsetup;"
        "from forwarder.config import load_config;"
        "from forwarder.dicom.deid_options import table_rows;"
        "from forwarder.dicom.deidentify import basic_profile;"
        "assert len(table_rows()) == 621 and basic_profile().exact;"
        "print(load_config(sys.argv[2]).destinations[0].name)"
    )
    result = _run(
        [
            str(DEBIAN_PYTHON),
            "-I",
            "-c",
            code,
            str(root / "usr/lib/forwarder"),
            str(root / "etc/forwarder/forwarder.yaml"),
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pacs"


_THROWAWAY_ROOT = r"""
set -eu
base=$1; deb=$2
mount -t tmpfs tmpfs "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
mount --bind /proc "$base/root/proc"
mount --bind /dev "$base/root/dev"
r=$base/root
cp "$deb" "$r/tmp/forwarder.deb"
rm -f "$r/var/lib/man-db/auto-update"  # skip man-db's slow index trigger (in the overlay only)
in_root() { chroot "$r" "$@"; }
# python3-systemd is not needed for these checks; the host may lack it.
in_root dpkg -i --force-depends /tmp/forwarder.deb >/dev/null 2>&1 \
    || { echo "dpkg -i failed"; in_root dpkg -i --force-depends /tmp/forwarder.deb; exit 1; }
echo "version=$(in_root /usr/bin/forwarder --version)"
echo "user=$(in_root getent passwd forwarder | cut -d: -f1,6,7)"
echo "incoming=$(in_root stat -c '%a %U %G' /var/spool/forwarder/incoming)"
echo "state=$(in_root stat -c '%a %U %G' /var/lib/forwarder)"
echo "conffile=$(in_root dpkg-query -W -f='${Conffiles}' forwarder | awk 'NF {print $1}')"
echo "status=$(in_root dpkg-query -W -f='${Status}' forwarder)"
conf=/etc/forwarder/forwarder.yaml
echo "check-config=$(in_root forwarder check-config -c "$conf" >/dev/null 2>&1; echo $?)"
# The daemon, as its user, on the packaged config (this network namespace is private).
ip link set lo up
chroot --userspec=forwarder:forwarder "$r" env -i PATH=/usr/bin:/bin \
    /usr/bin/forwarder run -c "$conf" 2> "$base/daemon.log" &
daemon=$!
scrape='import urllib.request as u; print(u.urlopen("http://127.0.0.1:9750/metrics").read().decode())'
deadline=$(( $(date +%s) + 30 ))
until in_root python3 -c "$scrape" > "$base/metrics.txt" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { kill "$daemon"; cat "$base/daemon.log" >&2; exit 1; }
    sleep 0.1
done
echo "metrics=$(grep -c '^forwarder_build_info' "$base/metrics.txt")"
echo "queue-db=$(in_root stat -c %U /var/lib/forwarder/queue.sqlite)"
echo "not DICOM" > "$r/var/spool/forwarder/incoming/.note.txt"
mv "$r/var/spool/forwarder/incoming/.note.txt" "$r/var/spool/forwarder/incoming/note.txt"
until [ -f "$r/var/spool/forwarder/failed/note.txt.error.json" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { kill "$daemon"; cat "$base/daemon.log" >&2; exit 1; }
    sleep 0.1
done
echo "rejected=$(cat "$r/var/spool/forwarder/failed/note.txt")"
kill -TERM "$daemon"
code=0; wait "$daemon" || code=$?
echo "daemon-exit=$code"
rm -rf "$r/var/spool/forwarder/failed/"*
in_root sh -c 'echo "# local edit" >> /etc/forwarder/forwarder.yaml'
in_root dpkg --remove forwarder >/dev/null 2>&1
echo "after-remove-user=$(in_root getent passwd forwarder | cut -d: -f1)"
echo "after-remove-conf=$(test -f "$r/etc/forwarder/forwarder.yaml" && echo kept)"
echo "after-remove-bin=$(test -e "$r/usr/bin/forwarder" && echo present || echo gone)"
in_root dpkg --purge forwarder >/dev/null 2>&1
echo "after-purge-user=$(in_root getent passwd forwarder || echo none)"
for p in /etc/forwarder /var/lib/forwarder /var/spool/forwarder /usr/lib/forwarder; do
    echo "after-purge $p=$(test -e "$r$p" && echo present || echo gone)"
done
# Purge with an undelivered file in failed/: the file (patient data) must survive.
in_root dpkg -i --force-depends /tmp/forwarder.deb >/dev/null 2>&1
echo DICM > "$r/var/spool/forwarder/failed/kept.dcm"
echo "purge-message=$(in_root dpkg --purge forwarder 2>&1 | grep -c 'kept /var/spool/forwarder')"
echo "kept-file=$(cat "$r/var/spool/forwarder/failed/kept.dcm")"
echo "kept-incoming=$(test -e "$r/var/spool/forwarder/incoming" && echo present || echo gone)"
echo "kept-user=$(in_root getent passwd forwarder || echo none)"
"""


def test_install_run_remove_purge_in_a_throwaway_root(deb: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a mount namespace and chroot")
    unshare = _need("unshare")
    _need("ip")
    probe = _run([unshare, "-m", "-n", "true"])
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace: {probe.stderr.strip()}")
    host_dpkg_before = _run(["dpkg-query", "-W", "forwarder"]).stdout
    base = tmp_path / "throwaway"
    base.mkdir()
    result = _run(
        [
            unshare,
            "-m",
            "--propagation",
            "private",
            "bash",
            "-c",
            _THROWAWAY_ROOT,
            "x",
            str(base),
            str(deb),
        ]
    )
    if "wrong fs type" in result.stderr or "unknown filesystem type" in result.stderr:
        pytest.skip(f"no overlayfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    out = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert out["version"] == f"forwarder {__version__}"
    assert out["user"] == "forwarder:/var/lib/forwarder:/usr/sbin/nologin"
    assert out["incoming"] == "2770 forwarder forwarder"
    assert out["state"] == "750 forwarder forwarder"
    assert out["conffile"] == "/etc/forwarder/forwarder.yaml"
    assert out["status"] == "install ok installed"
    assert out["check-config"] == "0"
    # The daemon ran as forwarder on the packaged config and folders, then stopped cleanly.
    assert out["metrics"] == "1"
    assert out["queue-db"] == "forwarder"
    assert out["rejected"] == "not DICOM"
    assert out["daemon-exit"] == "0"
    # remove keeps configuration and user; purge takes them, the queue and empty spool.
    assert out["after-remove-user"] == "forwarder"
    assert out["after-remove-conf"] == "kept"
    assert out["after-remove-bin"] == "gone"
    assert out["after-purge-user"] == "none"
    for p in ("/etc/forwarder", "/var/lib/forwarder", "/var/spool/forwarder", "/usr/lib/forwarder"):
        assert out[f"after-purge {p}"] == "gone", p
    assert out["purge-message"] == "1"
    assert out["kept-file"] == "DICM"
    assert out["kept-incoming"] == "gone"
    assert out["kept-user"] == "none"
    # Nothing leaked onto the host.
    assert _run(["dpkg-query", "-W", "forwarder"]).stdout == host_dpkg_before


def test_maintainer_scripts_are_posix_sh() -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = PACKAGING / "deb" / script
        assert path.read_text().startswith("#!/bin/sh\n")
        assert os.access(path, os.X_OK), script
        result = _run(["sh", "-n", str(path)])
        assert result.returncode == 0, result.stderr
        if shutil.which("shellcheck"):
            result = _run(["shellcheck", "-s", "sh", str(path)])
            assert result.returncode == 0, result.stdout
