"""``python -m qdqkit``: the same as the ``qdqkit`` console script."""

from qdqkit.cli import main

raise SystemExit(main())
