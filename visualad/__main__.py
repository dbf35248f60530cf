"""``python -m visualad`` is the ``visualad`` command."""
from .cli import main

raise SystemExit(main())
