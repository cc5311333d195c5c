"""Write forwarder(1) in roff from the argparse parsers, so the man page is the ``--help``
of every sub-command and never drifts from it.

    python packaging/manpage.py > forwarder.1

Used by build-deb.sh. The date comes from ``SOURCE_DATE_EPOCH`` (reproducible builds),
else today.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forwarder import __version__
from forwarder.cli import build_parser

_TEXT = {
    "files": [
        ("/etc/forwarder/forwarder.yaml", "the daemon's configuration (a conffile)"),
        ("/var/spool/forwarder/incoming", "the watched folder; members of group forwarder write"),
        ("/var/spool/forwarder/done", "delivered files, same relative path"),
        ("/var/spool/forwarder/failed", "undeliverable files, each with NAME.error.json"),
        ("/var/lib/forwarder/queue.sqlite", "the persistent queue"),
        ("/lib/systemd/system/forwarder.service", "the systemd unit (forwarder run)"),
        ("/usr/share/doc/forwarder/", "README.md, Grafana dashboard and Prometheus alerts"),
    ],
    "exit": [
        ("0", "success: every file stored (Success or Warning status)"),
        ("1", "a file was not stored, or a runtime failure"),
        ("2", "bad command line"),
        ("3", "send/echo: the peer could not be reached or refused the association"),
        ("78", "invalid configuration file (EX_CONFIG; systemd does not restart on it)"),
    ],
}


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on any line."""
    text = text.replace("\\", "\\e")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def option(text: str) -> str:
    """Bold option text with real minus signs, so the page can be searched and copied."""
    return roff(text).replace("-", "\\-")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _invocation(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if not action.option_strings:
        metavar = action.metavar or action.dest
        return f"\\fI{roff(' '.join(metavar) if isinstance(metavar, tuple) else metavar)}\\fR"
    parts = []
    for opt in action.option_strings:
        part = f"\\fB{option(opt)}\\fR"
        if action.nargs != 0:
            default = action.dest.upper()
            metavar = formatter._metavar_formatter(action, default)(1)[0]
            part += f" \\fI{roff(metavar)}\\fR"
        parts.append(part)
    return ", ".join(parts)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
        ]
        if not actions:
            continue
        title = group.title or "options"
        out.append(f".PP\n\\fI{roff(title[:1].upper() + title[1:])}\\fR")
        if group.description:
            out.append(f".br\n{roff(group.description)}")
        for action in actions:
            out.append(".TP")
            out.append(_invocation(action, formatter))
            help_text = formatter._expand_help(action) if action.help else ""
            out.append(roff(re.sub(r"\s+", " ", help_text).strip()) or "\\&")
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().strip().removeprefix("usage: ")
    return ".nf\n" + roff(re.sub(r"\n\s+", "\n    ", usage)) + "\n.fi"


def _top_parser() -> argparse.ArgumentParser:
    built: Any = build_parser()  # the parser, or (parser, {name: sub-parser})
    parser = built[0] if isinstance(built, tuple) else built
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def render(prog: str = "forwarder") -> str:
    parser = _top_parser()
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    commands = _subcommands(parser)
    out = [
        f'.TH FORWARDER 1 "{when:%Y-%m-%d}" "forwarder {__version__}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {roff((parser.description or '').rstrip('.'))}",
        ".SH SYNOPSIS",
        f"\\fB{prog}\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".br",
        f"\\fB{prog}\\fR \\fB\\-V\\fR | \\fB\\-\\-version\\fR",
        ".SH DESCRIPTION",
        roff(
            "forwarder watches a folder, queues every complete DICOM file in a SQLite "
            "database and forwards it with C-STORE over pooled associations to the "
            "configured destinations, then moves it to done/ or failed/. Delivery is at "
            "least once. The same program replaces DCMTK storescu/storescp/echoscu and "
            "dcm4che dcmsnd for manual sends, echoes and a receiving Storage SCP."
        ),
        ".PP",
        roff(
            "The daemon (forwarder run) is started by systemd as forwarder.service; "
            "systemctl reload forwarder re-reads the configuration (SIGHUP)."
        ),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, sub in commands.items():
        out.append(f".SS {prog} {name}")
        out.append(_usage(sub))
        if sub.description:
            out.append(".PP\n" + roff(sub.description))
        out.extend(_options(sub))
    out.append(".SH ENVIRONMENT")
    out.append(".TP\n\\fBFORWARDER_CONFIG\\fR")
    out.append(
        "the configuration file when \\fB\\-c\\fR is not given "
        "(default /etc/forwarder/forwarder.yaml)"
    )
    out.append(".TP\n\\fBNOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\\fR, \\fBJOURNAL_STREAM\\fR")
    out.append(
        "set by systemd: readiness and watchdog notification, structured journal "
        "fields (DESTINATION, SOP_INSTANCE_UID, DIMSE_STATUS, FILE, OUTCOME)"
    )
    out.append(".SH EXIT STATUS")
    for code, meaning in _TEXT["exit"]:
        out.append(f".TP\n\\fB{code}\\fR\n{roff(meaning)}")
    out.append(".SH FILES")
    for path, meaning in _TEXT["files"]:
        out.append(f".TP\n\\fI{roff(path)}\\fR\n{roff(meaning)}")
    out.append(".SH EXAMPLES")
    out.append(
        ".nf\n"
        "journalctl \\-u forwarder DESTINATION=pacs OUTCOME=failed\n"
        "forwarder status \\-\\-json\n"
        "forwarder send PACS@10.0.0.5:104 /data/study/\n"
        "forwarder echo PACS@10.0.0.5:104\n"
        ".fi"
    )
    out.append(".SH SEE ALSO")
    out.append(
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBstorescu\\fR(1), "
        "\\fBstorescp\\fR(1), \\fBechoscu\\fR(1)"
    )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
