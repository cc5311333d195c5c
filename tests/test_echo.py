"""``forwarder echo`` as a subprocess: exit codes and addressing, against real peers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FORWARDER
from hostile import Behaviour, HostilePeer
from peers import ScriptedSCP, free_port, start_server, storescp
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification


def echo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FORWARDER, "echo", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def verification_scp() -> Iterator[Any]:
    """A pynetdicom SCP that answers C-ECHO with the status in ``server.echo_status``
    and rejects any called AE title but RIGHT."""
    ae = AE(ae_title="RIGHT")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    state = {"status": 0x0000}
    server = start_server(
        ae,
        ("127.0.0.1", free_port()),
        evt_handlers=[(evt.EVT_C_ECHO, lambda event: state["status"])],
    )
    server.state = state
    try:
        yield server
    finally:
        server.shutdown()


def test_echo_dcmsnd_form(forwarder_env: dict[str, str]) -> None:
    with ScriptedSCP() as scp:
        r = echo(f"SCP@127.0.0.1:{scp.port}", env=forwarder_env)
    assert r.returncode == 0, r.stderr
    assert "answered Success" in r.stderr


def test_echo_storescu_form_with_called_aet(
    forwarder_env: dict[str, str], verification_scp: Any
) -> None:
    port = str(verification_scp.socket.getsockname()[1])
    r = echo("127.0.0.1", port, "-c", "RIGHT", env=forwarder_env)
    assert r.returncode == 0, r.stderr
    r = echo("127.0.0.1", port, "--called-aet", "RIGHT", "-aet", "ME", env=forwarder_env)
    assert r.returncode == 0, r.stderr


def test_echo_dcmtk_storescp(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    with storescp(tmp_path / "out") as scp:
        r = echo(f"{scp.ae_title}@127.0.0.1:{scp.port}", "-L", "TESTER", env=forwarder_env)
    assert r.returncode == 0, r.stderr


def test_echo_repeat(forwarder_env: dict[str, str]) -> None:
    with HostilePeer() as peer:
        r = echo(f"X@127.0.0.1:{peer.port}", "-r", "3", env=forwarder_env)
    assert r.returncode == 0, r.stderr
    assert [c.command_field for c in peer.commands] == [0x0030] * 3
    assert peer.connections == 1 and peer.released.is_set()


def test_echo_nothing_listening_exits_3(forwarder_env: dict[str, str]) -> None:
    r = echo(f"SCP@127.0.0.1:{free_port()}", env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "cannot connect" in r.stderr


def test_echo_rejected_association_exits_3(
    forwarder_env: dict[str, str], verification_scp: Any
) -> None:
    port = verification_scp.socket.getsockname()[1]
    r = echo(f"WRONG@127.0.0.1:{port}", env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "rejected" in r.stderr


def test_echo_rejected_by_raw_peer_exits_3(forwarder_env: dict[str, str]) -> None:
    with HostilePeer(Behaviour.REJECT) as peer:
        r = echo(f"X@127.0.0.1:{peer.port}", env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "rejected-permanent" in r.stderr


def test_echo_no_association_answer_within_connect_timeout_exits_3(
    forwarder_env: dict[str, str],
) -> None:
    with HostilePeer(Behaviour.NO_AC) as peer:
        r = echo(f"X@127.0.0.1:{peer.port}", "-connectTO", "300", env=forwarder_env)
    assert r.returncode == 3, r.stderr
    assert "within 0.3s" in r.stderr


def test_echo_failure_status_exits_1(forwarder_env: dict[str, str], verification_scp: Any) -> None:
    verification_scp.state["status"] = 0x0211  # unrecognised operation
    port = verification_scp.socket.getsockname()[1]
    r = echo(f"RIGHT@127.0.0.1:{port}", env=forwarder_env)
    assert r.returncode == 1, r.stderr
    assert "0x0211" in r.stderr


def test_echo_no_response_within_rsp_timeout_exits_1(forwarder_env: dict[str, str]) -> None:
    with HostilePeer(Behaviour.NEVER_ANSWER) as peer:
        r = echo(f"X@127.0.0.1:{peer.port}", "-rspTO", "300", env=forwarder_env)
        assert peer.aborted.wait(5)
    assert r.returncode == 1, r.stderr
    assert "within 0.3s" in r.stderr


def test_echo_to_a_peer_without_verification_exits_1(forwarder_env: dict[str, str]) -> None:
    """The peer took the association but not the Verification context: echo said exit 3
    ("unreachable or refused the association"), so the operator looked at the network; echoscu
    says "No Acceptable Presentation Contexts" and exits 1."""
    ae = AE(ae_title="STOREONLY")
    ae.add_supported_context(CTImageStorage)
    server = start_server(ae, ("127.0.0.1", free_port()))
    try:
        port = server.socket.getsockname()[1]
        r = echo(f"STOREONLY@127.0.0.1:{port}", env=forwarder_env)
    finally:
        server.shutdown()
    assert r.returncode == 1, r.stderr
    assert "did not accept Verification" in r.stderr


def test_echo_destination_from_config(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    with ScriptedSCP(ae_title="CFGPEER") as scp:
        config = tmp_path / "forwarder.yaml"
        config.write_text(
            f"""\
ae_title: CFGCALLER
incoming: {tmp_path}/incoming
done: {tmp_path}/done
failed: {tmp_path}/failed
queue: {tmp_path}/queue.sqlite
destinations:
  - name: pacs
    ae_title: CFGPEER
    host: 127.0.0.1
    port: {scp.port}
"""
        )
        r = echo("--destination", "pacs", "-c", str(config), env=forwarder_env)
        assert r.returncode == 0, r.stderr
        assert f"CFGPEER@127.0.0.1:{scp.port}" in r.stderr
        r = echo("--destination", "nope", "-c", str(config), env=forwarder_env)
        assert r.returncode == 2, r.stderr
        assert "pacs" in r.stderr  # names the destinations it knows


def test_echo_invalid_config_exits_78(tmp_path: Path, forwarder_env: dict[str, str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ae_title: X\nbogus_key: 1\n")
    r = echo("--destination", "pacs", "-c", str(config), env=forwarder_env)
    assert r.returncode == 78, r.stderr
    assert "bogus_key" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["SCP@127.0.0.1:11112", "extra.dcm"],
        ["SCP@127.0.0.1:99999"],
        ["SCP@127.0.0.1:11112", "-connectTO", "soon"],
        ["SCP@127.0.0.1:11112", "--no-such-option"],
    ],
    ids=["no-target", "extra-args", "bad-port", "bad-timeout", "unknown-option"],
)
def test_echo_bad_command_line_exits_2(argv: list[str], forwarder_env: dict[str, str]) -> None:
    r = echo(*argv, env=forwarder_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip()
