"""``forwarder run``: the daemon in the foreground (what systemd runs)."""

from __future__ import annotations

import argparse
import faulthandler
import sys
from typing import Any

from forwarder.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from forwarder.cli._config import add_config_option, load_or_report
from forwarder.errors import ForwarderError, SetupError, TLSSetupError
from forwarder.logsetup import journal_prefix


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the forwarding daemon in the foreground",
        description="Watch the incoming folder and forward every complete DICOM file to its "
        "destinations. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config. "
        "Exit 78 on an invalid config (systemd does not restart on it).",
    )
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, config = load_or_report(args, "run")
    if config is None:
        return EXIT_CONFIG
    from forwarder.daemon.service import Service
    from forwarder.logsetup import configure_daemon_logging

    configure_daemon_logging(config.log_level, log_phi=config.log_phi)
    # Every thread's stack on stderr (the journal under systemd) when the watchdog aborts a
    # hung daemon (SIGABRT) or it crashes; on demand without stopping it (SIGUSR1) once the
    # service runs (it registers it: `systemctl kill -s USR1 forwarder`, or kill -USR1 PID).
    faulthandler.enable(all_threads=True)
    try:
        return Service(config, path).run() or EXIT_OK
    except (TLSSetupError, SetupError) as exc:
        print(f"{journal_prefix()}forwarder run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ForwarderError as exc:
        print(f"{journal_prefix()}forwarder run: {exc}", file=sys.stderr)
        return EXIT_FAILED
