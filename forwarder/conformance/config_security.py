"""The Conformance Statement's sections after the AE specifications (3.3 to 7).

Network interfaces (3.3), configuration: AE title mapping and every parameter of the config file
and the command lines, read from their models and parsers (3.4), media interchange (4), character
sets (5), security: the TLS settings (6), and the annexes (7).
"""

from __future__ import annotations

import ssl

from forwarder.config import Config, Destination, RetryPolicy, TLSConfig
from forwarder.conformance.engine import _Engine, _field_rows, _option_rows
from forwarder.conformance.markdown import _table
from forwarder.net import tls


def _network_interfaces(e: _Engine) -> list[str]:
    return [
        "### 3.3 Network Interfaces",
        "",
        "#### 3.3.1 Physical Network Interface",
        "",
        "Whatever TCP/IP interface the operating system provides; IPv4 and IPv6.",
        "",
        "#### 3.3.2 Additional Protocols",
        "",
        "Host names are resolved with the system resolver. DICOM over TLS (PS3.15 B.9/B.11) per "
        "destination or command line; see 6. No other protocol is used for DICOM traffic.",
        "",
    ]


def _configuration(e: _Engine) -> list[str]:
    retry_rows = _field_rows(RetryPolicy, "retry.")
    return [
        "### 3.4 Configuration",
        "",
        "#### 3.4.1 AE Title / Presentation Address Mapping",
        "",
        "Our calling AE title is `ae_title` (default "
        f"`{Config.model_fields['ae_title'].default}`), "
        "or a destination's `calling_ae_title`; for `send`/`echo` `--calling-aet` "
        f"(default `{e.send.calling_ae_title}`). Each destination names the called AE title, "
        "host and port of its peer. `forwarder receive` listens as `--ae-title` on `--bind`:"
        "`--port`.",
        "",
        "#### 3.4.2 Parameters",
        "",
        "Config file keys (`forwarder run`; `forwarder send --destination NAME` uses a "
        "destination's too), with the defaults the code applies:",
        "",
        *_table(
            ["Key", "Default", "Meaning"],
            [
                *_field_rows(
                    Config, "", skip=("destinations", "routes", "watch", "metrics", "retry")
                ),
                *_field_rows(Destination, "destinations[].", skip=("tls",)),
                *_field_rows(TLSConfig, "destinations[].tls."),
                *retry_rows,
            ],
        ),
        "`forwarder send` and `forwarder echo` options (seed spellings such as `-connectTO` "
        "are accepted too, see `--help`):",
        "",
        *_table(["Option", "Default", "Meaning"], _option_rows(e.parsers["send"])),
        "`forwarder receive` options:",
        "",
        *_table(["Option", "Default", "Meaning"], _option_rows(e.parsers["receive"])),
    ]


def _media(e: _Engine) -> list[str]:
    return [
        "## 4 Media Interchange",
        "",
        "Not supported. (forwarder reads and writes DICOM Part 10 files in folders, but not as a "
        "File-set with a DICOMDIR on interchange media.)",
        "",
    ]


def _character_sets(e: _Engine) -> list[str]:
    return [
        "## 5 Support of Character Sets",
        "",
        "forwarder does not interpret, convert or replace character data. Data sets are sent "
        "byte for byte as they are in the file, Specific Character Set (0008,0005) included, "
        "so any character set the file declares reaches the peer unchanged; a conversion "
        "between transfer syntaxes (3.2.1.4) re-encodes values but keeps their bytes and the "
        "declared character set. The receiver stores what it receives as received. Routing "
        "matches header values as the file holds them, decoded in its Specific Character Set "
        "(none declared: read as UTF-8). AE titles are ASCII (printable, 1-16 "
        "characters, no backslash).",
        "",
    ]


def _security(e: _Engine) -> list[str]:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls._harden(client)
    options = []
    if client.options & ssl.OP_NO_COMPRESSION:
        options.append("no TLS compression")
    if client.options & ssl.OP_NO_RENEGOTIATION:
        options.append("no renegotiation")
    version = client.minimum_version.name.replace("v", " ").replace("_", ".")
    s = e.receive_settings
    return [
        "## 6 Security",
        "",
        "### 6.1 Security Profiles",
        "",
        "DICOM TLS following the BCP 195 profile (PS3.15 B.9/B.11), as DCMTK's default:",
        "",
        *_table(
            ["", ""],
            [
                ["Minimum protocol version", version + " (TLS 1.3 whenever the peer has it)"],
                ["TLS 1.2 cipher suites (OpenSSL string)", f"`{tls._TLS12_CIPHERS}`"],
                ["TLS 1.3 cipher suites", "OpenSSL's (all AEAD)"],
                ["Other", ", ".join(options)],
                [
                    "SCU (`run`, `send`, `echo`)",
                    "the peer's certificate is always verified (`tls.ca`, else the system "
                    "store) and, unless `verify_hostname: false`, its name against the host; "
                    "`tls.cert`/`tls.key` add our certificate (mutual TLS); a destination with "
                    "TLS never falls back to plain TCP",
                ],
                [
                    "SCP (`receive`)",
                    "`--tls-cert`/`--tls-key`; `--tls-ca` requires and verifies client "
                    "certificates (mutual TLS)",
                ],
                ["Private keys", "refused when group or others may read them"],
            ],
        ),
        "### 6.2 Association Level Security",
        "",
        *_table(
            ["Check (forwarder receive)", "Default", "Rejection"],
            [
                [
                    "`--allow-calling-aet AET` (repeatable)",
                    "any"
                    if not s.allowed_calling_aets
                    else ", ".join(sorted(s.allowed_calling_aets)),
                    "A-ASSOCIATE-RJ permanent, calling AE title not recognised",
                ],
                [
                    "`--require-called-aet`",
                    "on" if s.require_called_aet else "off",
                    "A-ASSOCIATE-RJ permanent, called AE title not recognised",
                ],
                [
                    "`--allow-host ADDR_OR_CIDR` (repeatable)",
                    "any" if not s.allowed_networks else ", ".join(map(str, s.allowed_networks)),
                    "connection closed before any PDU",
                ],
            ],
        ),
        "The SCUs send their calling AE title and the destination's called AE title; they do "
        "not send User Identity.",
        "",
        "### 6.3 Application Level Security",
        "",
        "None beyond the above. Logs name UIDs, paths, AE titles and statuses, never patient "
        "names or IDs (unless the config's `log_phi` debug switch is on).",
        "",
    ]


def _annexes(e: _Engine) -> list[str]:
    return [
        "## 7 Annexes",
        "",
        "### 7.1 IOD Contents",
        "",
        "**Created SOP Instances.** None: forwarder only transfers instances others created.",
        "",
        "**Usage of attributes from received IODs.** The sender reads the File Meta "
        "Information (Media Storage SOP Class/Instance UID, Transfer Syntax UID) and checks "
        "that the data set is complete and holds its own SOP Class and SOP Instance UID. The "
        "daemon's router reads the attributes its routes match on. The receiver reads the "
        "Study Instance UID and SOP Instance UID to name the file.",
        "",
        "**Coerced/modified fields.** None. A converted file (3.2.1.4) keeps every attribute and "
        "its SOP Instance UID; only the encoding changes.",
        "",
        "### 7.2 Data Dictionary of Private Attributes",
        "",
        "None defined. Private attributes are passed through unchanged.",
        "",
        "### 7.3 Private Transfer Syntaxes and SOP Classes",
        "",
        "None defined. A file in a private transfer syntax or SOP class is proposed as it is "
        "(3.2.1.3); the receiver accepts private SOP classes with `--promiscuous`.",
        "",
    ]
