"""``python -m layerfreeze``: the same command line as the ``layerfreeze`` script."""

from __future__ import annotations

if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main())
