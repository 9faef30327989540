"""Tiny checkpoints in the real on-disk layouts, for tests (and for the built-in demo)."""
from .dit import random_dit_state, write_dit_checkpoint, write_dit_dir  # noqa: F401
from .vae import write_tiny_vae  # noqa: F401
from .text import write_tiny_text_encoder  # noqa: F401
from .clip import write_tiny_clip  # noqa: F401
from .checkpoint import demo_image, write_demo_checkpoint, write_tiny_checkpoint  # noqa: F401
