"""Generated DICOM files for tests: real Part 10 files written by pydicom, unique UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane^Sensitive"  # tests grep logs for this: it must never appear
PATIENT_ID = "PID-SECRET-4711"


def make_dataset(
    *,
    modality: str = "CT",
    rows: int = 64,
    columns: int = 64,
    frames: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_instance_uid: str | None = None,
    study_uid: str | None = None,
    station: str = "SCANNER1",
    seed: int = 0,
) -> Dataset:
    """A small valid image of ``modality`` with 16-bit pixels (RLE-compressed if asked)."""
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.StationName = station
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Rows = rows
    ds.Columns = columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    ds.PixelData = rng.integers(0, 4096, size=shape, dtype=np.uint16).tobytes()
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def write_file(path: Path, **kwargs: object) -> Dataset:
    """Write a generated image to ``path`` (parents created) and return its data set."""
    ds = make_dataset(**kwargs)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_files(folder: Path, count: int, prefix: str = "img", **kwargs: object) -> list[Path]:
    """``count`` images ``folder/prefix0000.dcm``...; returns their paths."""
    paths = []
    for i in range(count):
        p = folder / f"{prefix}{i:04d}.dcm"
        write_file(p, seed=i, **kwargs)
        paths.append(p)
    return paths
