"""``forwarder send URL`` and ``echo URL`` against a scripted STOW-RS server, as a subprocess:
exit codes, the report, the token, --destination with url, refused secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FORWARDER
from dicomgen import write_files
from peers import free_port
from stowserver import Answer, Seen, StowServer

from forwarder.dicom.part10 import read_meta


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("t0ken\n")
    path.chmod(0o600)
    return path


def test_partial_failure_exits_1_with_a_report_per_file(
    tmp_path: Path, token: Path, forwarder_env: dict[str, str]
) -> None:
    files = write_files(tmp_path / "in", 3)
    bad = read_meta(str(files[1])).sop_instance_uid
    report = tmp_path / "r.json"
    with StowServer(Answer(status=202, failed={bad: 0xA900})) as server:
        result = run("send", server.url, str(tmp_path / "in"), "--bearer-token-file", str(token),
                     "--report", str(report), env=forwarder_env)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "2 stored (0 with warnings), 1 failed" in result.stderr
    assert f"FAILED {files[1]}" in result.stderr and "0xA900" in result.stderr
    assert "t0ken" not in result.stderr
    (post,) = server.posts()
    assert post.headers["authorization"] == "Bearer t0ken"
    doc = json.loads(report.read_text())
    assert doc["peer"] == {"url": server.url}
    assert [(r["outcome"], r["status"]) for r in doc["files"]] == [
        ("stored", "0x0000"),
        ("failed", "0xA900"),
        ("stored", "0x0000"),
    ]


def test_send_to_a_config_destination_with_url(
    tmp_path: Path, token: Path, forwarder_env: dict[str, str]
) -> None:
    files = write_files(tmp_path / "in", 2)
    with StowServer() as server:
        config = tmp_path / "f.yaml"
        config.write_text(
            "incoming: in\ndone: done\nfailed: failed\nqueue: q.sqlite\n"
            f"destinations:\n  - name: cloud\n    url: {server.url}\n"
            f"    auth: {{bearer_token_file: {token}}}\n    associations: 2\n"
        )
        result = run("send", "--destination", "cloud", "-c", str(config), *map(str, files),
                     env=forwarder_env)  # fmt: skip
        echo = run("echo", "--destination", "cloud", "-c", str(config), env=forwarder_env)
    assert result.returncode == 0, result.stderr
    assert echo.returncode == 0, echo.stderr
    assert sorted(server.uids()) == sorted(read_meta(str(f)).sop_instance_uid for f in files)
    (get,) = [s for s in server.seen if s.method == "GET"]
    assert get.path == "/dicom-web/studies?limit=1"
    assert get.headers["authorization"] == "Bearer t0ken"


def test_a_readable_token_file_is_refused_before_anything_is_sent(
    tmp_path: Path, token: Path, forwarder_env: dict[str, str]
) -> None:
    files = write_files(tmp_path / "in", 1)
    token.chmod(0o644)
    with StowServer() as server:
        result = run("send", server.url, str(files[0]), "--bearer-token-file", str(token),
                     env=forwarder_env)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "accessible by others" in result.stderr and "chmod 600" in result.stderr
    assert server.seen == []


def test_echo_answers_by_http_status(forwarder_env: dict[str, str]) -> None:
    def answer(seen: Seen) -> Answer:
        return Answer(status=500, body=b"broken") if "x" in seen.path else Answer(status=204)

    with StowServer(answer) as server:
        ok = run("echo", server.url, env=forwarder_env)
        broken = run("echo", server.url.replace("dicom-web", "x"), env=forwarder_env)
    assert ok.returncode == 0, ok.stderr
    assert broken.returncode == 1 and "HTTP 500" in broken.stderr


def test_bad_urls_and_options_are_usage_errors(
    tmp_path: Path, forwarder_env: dict[str, str]
) -> None:
    f = write_files(tmp_path / "in", 1)[0]
    for args in (
        ["https://u:p@h/dw", str(f)],
        ["http://127.0.0.1:9/dw", str(f), "--tls-ca", str(f)],
        ["http://127.0.0.1:9/dw", str(f), "--user", "u"],
        ["http://127.0.0.1:9/dw"],
    ):
        result = run("send", *args, env=forwarder_env)
        assert result.returncode == 2, (args, result.stderr)


@pytest.mark.parametrize("target", ["url", "ae"])
def test_send_does_not_load_the_config_models(
    tmp_path: Path, target: str, forwarder_env: dict[str, str]
) -> None:
    """A send without ``-c`` never imports pydantic and the config models: ~0.2-0.5 s of every
    ``forwarder send URL`` went there (its URL check lived beside the models)."""
    files = write_files(tmp_path / "in", 1)
    with StowServer(Answer(status=200)) as server:
        peer = server.url if target == "url" else f"NOBODY@127.0.0.1:{free_port()}"
        code = (
            "import sys\nfrom forwarder.cli import main\n"
            f"status = main(['send', '-q', {peer!r}, {str(files[0])!r}])\n"
            "print(status, sorted(m for m in ('pydantic', 'forwarder.config') if m in sys.modules))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=forwarder_env,
            timeout=60, check=False,
        )  # fmt: skip
    status, loaded = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", result.stderr
    assert status == ("0" if target == "url" else "3"), result.stderr  # 3: no association
