"""The error every imaging step raises for an input that is not a usable image."""


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""
