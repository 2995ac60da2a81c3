"""``python -m coda_adapters``: the ``coda`` command line (the application, not the library)."""

import sys

from .app.cli import main

sys.exit(main())
