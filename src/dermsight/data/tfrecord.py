"""TFRecord shards in the SIIM-ISIC 2020 layout (``train00-2071.tfrec`` ...).

Each record is a tf.train.Example with ``image`` (encoded JPEG bytes), ``image_name``,
``target`` and optionally ``patient_id``, ``sex``, ``age_approx``,
``anatom_site_general_challenge`` and ``diagnosis``. The competition's own shards
label-encoded the categorical columns as integers; those cannot be decoded without
the encoder, so when a metadata CSV (train.csv) is given its values are used instead.

Images stay inside the shard: a record's image_ref is ``shard.tfrec#byte_offset``,
read back with :func:`dermsight.imaging.tfrecord_image.read_tfrecord_image`.
"""

from __future__ import annotations

import struct
from pathlib import Path

from dermsight.data.records import Loaded, RecordBuilder, SourceError, read_csv
from dermsight.imaging.tfrecord_image import FOOTER_BYTES, HEADER_BYTES, example_pb2
_CATEGORICAL = ("patient_id", "sex", "anatom_site_general_challenge", "diagnosis")


def read_tfrecords(paths: list[Path], metadata_csv: Path | None = None) -> Loaded:
    """Records of the images in SIIM-ISIC 2020 .tfrec shards, with metadata from the shards or `metadata_csv`."""
    from tfrecord.reader import tfrecord_iterator

    if not paths:
        raise SourceError("no .tfrec files given")
    metadata = {}
    if metadata_csv is not None:
        metadata = read_csv(metadata_csv, ("image_name",)).set_index("image_name").to_dict("index")
    builder = RecordBuilder("tfrecord")
    for path in paths:
        offset = 0
        try:
            for raw in tfrecord_iterator(str(path)):
                where = f"{path} record at byte {offset}"
                _add_example(builder, where, bytes(raw), f"{path}#{offset}", metadata)
                offset += HEADER_BYTES + len(raw) + FOOTER_BYTES
        except (RuntimeError, struct.error, OSError) as err:
            builder.problem("unreadable_shard", f"{path} at byte {offset}", f"TFRecord shard is truncated or corrupt ({err}); later records skipped", skipped=True)
    return builder.loaded()


def _add_example(builder: RecordBuilder, where: str, raw: bytes, ref: str, metadata: dict) -> None:
    example = example_pb2().Example()
    try:
        example.ParseFromString(raw)
    except Exception as err:  # protobuf's DecodeError
        builder.problem("unreadable_image", where, f"not a tf.train.Example ({err})", skipped=True)
        return
    features = {name: _value(feature) for name, feature in example.features.feature.items()}
    if not isinstance(features.get("image"), bytes):
        builder.problem("unreadable_image", where, "record has no 'image' bytes feature", skipped=True)
        return
    image_name = features.get("image_name")
    if isinstance(image_name, bytes):
        image_name = image_name.decode("utf-8", "replace")
    meta = metadata.get(image_name, {})
    fields = {}
    for name in ("patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis", "target"):
        value = features.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif name in _CATEGORICAL and isinstance(value, int):
            value = None  # label-encoded integer: meaningless without the encoder
        fields[name] = meta.get(name) if meta.get(name) not in (None, "") else value
    label = fields["diagnosis"] or None
    target = fields["target"]
    builder.add(
        where,
        image_id=image_name,
        image_ref=ref,
        patient_id=fields["patient_id"],
        age=fields["age_approx"],
        sex=fields["sex"],
        site=fields["anatom_site_general_challenge"],
        label=label,
        diagnosis=None if label or target is None else ("MEL" if str(target) == "1" else "UNK"),
        melanoma=target,
    )


def _value(feature) -> object:  # a tfrecord example_pb2.Feature
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    return values[0] if len(values) == 1 else (values or None)
