"""Fuzzing: the decoders and sanitiser on random and mutated bytes (only ImageError, never
another exception), the CSV readers on random text (only SourceError or problems, never a
traceback), and schemathesis against the app's OpenAPI schema (never a 5xx).

Runs are derandomised and bounded so the default suite stays fast and repeatable; set
DERMSIGHT_FUZZ_EXAMPLES (e.g. 5000) for a longer, random search. Every finding is kept
below as a regression test.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from test_dicom_tfrecord import dicom_bytes

from dermsight.data import readers
from dermsight.data.records import SourceError, read_csv
from dermsight.imaging.decode import ImageError, decode_image
from dermsight.imaging.sanitize import sanitize_image
from dermsight.serving.app import create_app

LONG = int(os.environ.get("DERMSIGHT_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(
        max_examples=LONG or examples, deadline=None, database=None, derandomize=not LONG,
        suppress_health_check=list(HealthCheck),
    )


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def seeds(shared) -> list[bytes]:
    """A real JPEG in every accepted format, DICOM compressed and not."""
    jpeg = (shared / "ham10000" / "images" / "ISIC_0024306.jpg").read_bytes()
    picture = Image.open(io.BytesIO(jpeg))
    return [
        jpeg, *(_encoded(picture, fmt) for fmt in ("PNG", "BMP", "TIFF", "WEBP")),
        dicom_bytes(jpeg, compressed=True, tags={"PatientName": "Doe^Jane"}),
        dicom_bytes(jpeg, compressed=False, tags={"PatientName": "Doe^Jane"}),
    ]


def only_image_errors(data: bytes) -> None:
    """decode_image and sanitize_image may refuse `data`, but only with ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for function in (decode_image, sanitize_image):
            try:
                function(data)
            except ImageError:
                pass


@st.composite
def mutations(draw, seeds: list[bytes]) -> bytes:
    """A seed with 1-8 byte flips, deletions, insertions or truncations."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        operation, at = draw(st.integers(0, 3)), draw(st.integers(0, max(0, len(data) - 1)))
        if operation == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif operation == 1:
            del data[at : at + draw(st.integers(1, 64))]
        elif operation == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data = data[: max(1, at)]
    return bytes(data)


MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\x00" * 128 + b"DICM", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x00\x00\x00WEBP"]


@fuzz_settings(150)
@given(head=st.sampled_from(MAGIC), tail=st.binary(max_size=400))
def test_magic_bytes_then_garbage(head, tail):
    only_image_errors(head + tail)


@fuzz_settings(50)
@given(data=st.binary(max_size=300))
def test_random_bytes(data):
    only_image_errors(data)


def test_mutated_real_images(seeds):
    @fuzz_settings(250)
    @given(data=mutations(seeds))
    def run(data):
        only_image_errors(data)

    run()


# -- findings, kept as regressions (each raised something other than ImageError) ---------


def _meta_group_length(dicom: bytes, length: int) -> bytes:
    """The DICOM with its File Meta group length (UL) given a `length`-byte value."""
    at = dicom.index(b"\x02\x00\x00\x00UL\x04\x00")
    value = dicom[at + 8 : at + 12] + b"\x00" * (length - 4)
    return dicom[: at + 6] + length.to_bytes(2, "little") + value + dicom[at + 12 :]


def _unknown_vr(dicom: bytes, element: bytes) -> bytes:
    """The DICOM with the VR of `element` (tag + VR bytes) replaced by an unknown one."""
    at = dicom.index(element)
    return dicom[: at + 4] + b"S\x0c" + dicom[at + 6 :]


TRUNCATED_META = (b"\x00" * 128 + b"DICM" + bytes.fromhex("02000000554c0400d0000000020001004f420000020000"))


@pytest.mark.parametrize("case", ["meta length not a multiple of 4", "meta cut mid-element"])
def test_dicom_findings_are_image_errors(case, seeds):
    """pydicom raised BytesLengthException (a UL of 5 bytes in the file meta) and
    struct.error (a file meta cut inside an element header)."""
    data = {
        "meta length not a multiple of 4": _meta_group_length(seeds[5], 5),
        "meta cut mid-element": TRUNCATED_META,
    }[case]
    for function in (decode_image, sanitize_image):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ImageError, match="unreadable DICOM"):
                function(data)


def test_a_broken_header_element_is_dropped_with_the_header(seeds):
    """An unknown VR in PatientName (pydicom raised NotImplementedError on it) does not
    matter to the pixels, and only the pixels are stored: sanitize_image keeps them."""
    data = _unknown_vr(seeds[5], b"\x10\x00\x10\x00PN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = decode_image(data)
        kept = sanitize_image(data)
    assert (kept.format, kept.original_format) == ("png", "dicom")
    assert np.array_equal(decode_image(kept.data), pixels)


# -- CSV readers ------------------------------------------------------------------------------

COLUMNS = [
    "lesion_id", "image_id", "dx", "age", "sex", "localization", "image_name", "patient_id", "age_approx",
    "anatom_site_general_challenge", "target", "diagnosis", "image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC",
    "SCC", "UNK", "AKIEC", "isic_id", "anatom_site_general", "diagnosis_1", "diagnosis_3", "benign_malignant",
    " dx", "dx ",
]
CELLS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "1", "0", "1.0", "nan", "NA", "-5", "300", "45", "male", "F", "back", "mel", "ISIC_0000001",
                     '"', '""', "a,b", "\n", "\x00", "1e309", "0.5"]),
)
CSV_NAMES = ("HAM10000_metadata.csv", "train.csv", "ISIC_2019_Training_GroundTruth.csv",
             "ISIC_2019_Training_Metadata.csv", "ISIC2018_Task3_Training_GroundTruth.csv", "metadata.csv",
             "ISIC2018_Task3_Training_LesionGroupings.csv")
READERS = {
    "read_csv": lambda folder: read_csv(folder / "train.csv", ("image_name",)),
    "ham10000": readers.read_ham10000,
    "isic2020 csv": lambda folder: readers.read_isic2020_csv(folder / "train.csv"),
    "isic2020 folder": readers.read_isic2020_folder,
    "isic2019": readers.read_isic2019,
    "isic2018": readers.read_isic2018,
    "isic-cli": readers.read_isic_cli,
}


@st.composite
def csv_files(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(COLUMNS), max_size=12))
    rows = draw(st.lists(st.lists(CELLS, max_size=len(header) + 2), max_size=6))
    separator = draw(st.sampled_from([",", ",", ";", "\t"]))

    def quoted(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if draw(st.booleans()) else value

    text = "\n".join([separator.join(header), *(separator.join(quoted(v) for v in row) for row in rows)])
    if draw(st.booleans()):
        text = draw(st.text(max_size=40)) + text
    return text.encode(draw(st.sampled_from(["utf-8", "latin-1", "utf-16"])), "replace")


@fuzz_settings(120)
@given(data=csv_files())
def test_csv_readers_never_crash(data):
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(folder)
        for name in CSV_NAMES:
            (folder / name).write_bytes(data)
        for reader in READERS.values():
            try:
                loaded = reader(folder)
            except SourceError:
                continue
            assert all(p.message for p in getattr(loaded, "problems", []))


# -- the API: schemathesis ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(serving_bundle, tmp_path_factory):
    """The app in --dev mode on a tmp store, as a schemathesis schema (ASGI, in process)."""
    app = create_app(serving_bundle, storage_dir=tmp_path_factory.mktemp("fuzz-api"), dev=True)
    with TestClient(app):  # run the lifespan
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_never_answers_5xx(api_schema):
    """Every operation, with schema-valid and schema-breaking requests (schemathesis's
    strategies under hypothesis: its pytest loader does not run on pytest 9)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 11
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @fuzz_settings(10)
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call()
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
                )

            try:
                run()
            except Unsatisfiable:  # nothing to break in an operation without parameters
                assert mode is schemathesis.GenerationMode.NEGATIVE


def test_api_regressions(serving_bundle, tmp_path):
    """Found by schemathesis: GET /api/patients/9223372036854775808 was a 500 (the SQLite
    driver overflowed). Ids are now bounded by the schema to the INTEGER range of the
    tables (2**31 - 1 on PostgreSQL): 422."""
    with TestClient(create_app(serving_bundle, storage_dir=tmp_path, dev=True)) as client:
        for huge in (2**31, 2**63, 2**70):
            for method, url in (("GET", f"/api/patients/{huge}"), ("DELETE", f"/api/patients/{huge}"),
                                ("POST", f"/api/patients/{huge}/rescore"), ("GET", f"/api/images/{huge}"),
                                ("GET", f"/api/images/{huge}/file"), ("DELETE", f"/api/images/{huge}"),
                                ("GET", f"/api/predictions/{huge}"), ("GET", f"/api/predictions/{huge}/heatmap"),
                                ("GET", f"/patients/{huge}")):
                response = client.request(method, url)
                assert response.status_code == 422, (method, url, response.status_code)
            upload = client.post("/api/images", files=[("files", ("x", b"\x00", "image/jpeg"))],
                                 data={"patient_id": str(huge)})
            assert upload.status_code == 422 and "patient_id" in upload.json()["detail"]
        assert client.get(f"/api/patients/{2**31 - 1}").status_code == 404
