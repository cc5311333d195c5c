"""DICOMweb destinations in the config: url or ae_title/host/port, auth, tls, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.config import Destination, parse_config
from forwarder.errors import ConfigError

HEAD = """\
incoming: in
done: done
failed: failed
queue: q.sqlite
destinations:
  - name: cloud
"""  # the destination's keys start on line 7


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + text, source="t.yaml")
    return info.value.problems


def test_a_url_destination_with_auth_and_tls_loads_and_resolves_paths(tmp_path: Path) -> None:
    text = (
        HEAD
        + "    url: https://archive.example.org/dicom-web/\n"
        + "    auth: {bearer_token_file: secrets/cloud.token}\n"
        + "    tls: {ca: ca.pem}\n"
        + "    associations: 4\n"
    )
    config = parse_config(text, base_dir=tmp_path)
    dest = config.destinations[0]
    assert dest.url == "https://archive.example.org/dicom-web"  # trailing slash dropped
    assert dest.is_dicomweb and dest.target == dest.url
    assert dest.auth is not None and dest.auth.bearer_token_file == tmp_path / "secrets/cloud.token"
    assert dest.tls is not None and dest.tls.ca == tmp_path / "ca.pem"
    assert dest.associations == 4
    assert dest.ae_title is None and dest.host is None and dest.port is None


def test_basic_auth_loads() -> None:
    text = HEAD + "    url: http://h:8042/dicom-web\n    auth: {username: u, password_file: /p}\n"
    auth = parse_config(text).destinations[0].auth
    assert auth is not None and auth.username == "u" and auth.password_file == Path("/p")


@pytest.mark.parametrize(
    ("keys", "where", "words"),
    [
        # both kinds
        ("    url: https://h/dw\n    host: 10.0.0.5\n", "destinations[0].host (line 8)", "url"),
        # neither
        ("    associations: 2\n", "destinations[0] (line 6)", "or url (DICOMweb"),
        # a DIMSE destination missing a key
        ("    ae_title: P\n    host: h\n", "destinations[0].port (line 6)", "required key"),
        # DICOMweb keys on a DIMSE destination
        (
            "    ae_title: P\n    host: h\n    port: 104\n    auth: {bearer_token_file: /t}\n",
            "destinations[0].auth (line 10)",
            "DICOMweb destinations (url) only",
        ),
        ("    url: ftp://h/dw\n", "destinations[0].url (line 7)", "http:// or https://"),
        ("    url: https://\n", "destinations[0].url (line 7)", "with a host"),
        ("    url: https://u:pw@h/dw\n", "destinations[0].url (line 7)", "credentials"),
        ("    url: https://h/dw?x=1\n", "destinations[0].url (line 7)", "query"),
        ("    url: http://h/dw\n    tls: {ca: /ca.pem}\n", "destinations[0].tls (line 8)", "https"),
        (
            "    url: https://h/dw\n    auth: {}\n",
            "destinations[0].auth (line 8)",
            "bearer_token_file, or username and password_file",
        ),
        (
            "    url: https://h/dw\n    auth: {bearer_token_file: /t, username: u}\n",
            "destinations[0].auth (line 8)",
            "not both",
        ),
        (
            "    url: https://h/dw\n    auth: {username: u}\n",
            "destinations[0].auth (line 8)",
            "go together",
        ),
        (
            "    url: https://h/dw\n    auth: {token: x}\n",
            "destinations[0].auth.token (line 8)",
            "unknown key",
        ),
        ("    url: https://h/dw\n    max_pdu: 0\n", "destinations[0].max_pdu (line 8)", "DICOMweb"),
    ],
)
def test_bad_shapes_are_one_line_each_with_key_and_line(keys: str, where: str, words: str) -> None:
    found = problems(keys)
    assert len(found) == 1, found
    assert found[0].startswith(where + ": ") and words in found[0], found


def test_a_destination_built_in_code_is_checked_too() -> None:
    with pytest.raises(ValueError, match="not both"):
        Destination(name="x", url="https://h/dw", host="h")
    with pytest.raises(ValueError, match="or url"):
        Destination(name="x")
    assert Destination(name="x", ae_title="P", host="h", port=104).target == "P@h:104"
