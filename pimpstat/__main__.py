"""``python -m pimpstat``: the same as the ``pimpstat`` console script."""

from pimpstat.app import main

raise SystemExit(main())
