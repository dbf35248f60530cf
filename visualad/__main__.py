"""``python -m visualad`` is the ``visualad`` command."""
from .cli import console

console()
