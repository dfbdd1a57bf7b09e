"""Error types of the core: each is a ValueError subclass where the caller's input is at fault,
so HTTP layers can map them to 4xx without knowing the model."""


class OspreyError(Exception):
    """Base of every error raised by osprey_core."""


class RegionError(OspreyError, ValueError):
    """A region (mask, RLE, polygon, box, point...) is malformed or does not fit the image."""


class ImageError(OspreyError, ValueError):
    """An image is unreadable, empty or of an unsupported mode."""


class PromptError(OspreyError, ValueError):
    """A prompt does not match its regions (e.g. `<mask>` count != number of regions)."""


class CheckpointError(OspreyError):
    """A checkpoint is missing, truncated, of the wrong shape or not a plain weights file."""


class ConfigError(OspreyError, ValueError):
    """A model config or preset name is invalid."""
