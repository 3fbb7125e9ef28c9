"""``python -m fxtap``: the ``fxtap`` command (also how ``torchrun -m fxtap`` runs it)."""

from .cli import main

raise SystemExit(main())
