"""``python -m dac_upload``: what the array script runs when runtime = "none"."""

from .cli import entry

entry()
