"""DICOM files dropped into the container's incoming folder, and where they went: done/ and
the DCMTK storescp destinations (compared byte for byte: storescp runs with --bit-preserving)."""

from __future__ import annotations

from pathlib import Path

from dicomgen import make_dataset
from helpers import expect, wait_until
from nspawn import Container

SPOOL = "/var/spool/forwarder"
PACS_DIR = "/srv/pacs"


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the File Meta group (explicit VR LE)."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return b""  # not (yet) a whole Part 10 file with a group length
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


class Drops:
    """Files dropped into the container's incoming folder, and checks on where they went."""

    def __init__(self, box: Container, scratch: Path) -> None:
        self.box, self.scratch = box, scratch
        self.count = 0

    def drop(self, tag: str) -> tuple[str, str, bytes]:
        """Write one new image atomically (a dot name, then rename); returns (name, uid, bytes)."""
        self.count += 1
        name = f"{tag}-{self.count:03d}.dcm"
        local = self.scratch / name
        ds = make_dataset(seed=self.count)
        ds.save_as(local, enforce_file_format=True)
        data, uid = local.read_bytes(), str(ds.SOPInstanceUID)
        incoming = self.box.path(f"{SPOOL}/incoming")
        tmp = incoming / f".{name}.part"
        tmp.write_bytes(data)
        tmp.rename(incoming / name)
        return name, uid, data

    def received(self, uid: str, folder: str = PACS_DIR) -> Path | None:
        hits = [p for p in self.box.path(folder).iterdir() if p.name.endswith(uid)]
        return hits[0] if hits else None

    def wait_delivered(
        self, name: str, uid: str, data: bytes, timeout: float = 60, to: tuple[str, ...] = ()
    ) -> None:
        done = self.box.path(f"{SPOOL}/done/{name}")
        sent = dataset_bytes(data)
        expect(sent != b"", f"{name}: the dropped file has no File Meta group length")
        for folder in (PACS_DIR, *to):

            def arrived() -> bool:  # storescp may still be writing it: compare until equal
                got = self.received(uid, folder)  # noqa: B023 (used at once)
                return got is not None and dataset_bytes(got.read_bytes()) == sent

            wait_until(f"{uid} in {folder}, its data set byte for byte", arrived, timeout)
        wait_until(f"{name} in done/", done.exists, timeout)
        expect(done.read_bytes() == data, f"done/{name} differs from the file dropped")
