"""Image bytes stored inside a TFRecord shard: an image_ref ``shard.tfrec#byte_offset``
(written by :mod:`dermsight.data.tfrecord`) read back without scanning the shard."""

from __future__ import annotations

import struct

from dermsight.imaging.errors import ImageError, reason

HEADER_BYTES = 12  # uint64 length + uint32 masked crc
FOOTER_BYTES = 4


def example_pb2():
    """tf.train.Example's protobuf module, imported on first use: the `tfrecord` package
    imports torch when it is installed (3 s), which every other command would pay for."""
    from tfrecord import example_pb2 as module

    return module


def read_tfrecord_image(path: str, offset: int) -> bytes:
    """The encoded image bytes of the record starting at `offset` in shard `path`."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            (length,) = struct.unpack("<Q", file.read(8))
            file.seek(4, 1)
            raw = file.read(length)
    except (OSError, struct.error) as err:
        raise ImageError(f"{path}#{offset}: cannot read TFRecord record ({reason(err)})") from None
    example = example_pb2().Example()
    try:
        example.ParseFromString(raw)
        return example.features.feature["image"].bytes_list.value[0]
    except Exception:
        raise ImageError(f"{path}#{offset}: no image in this TFRecord record") from None
