"""``python -m dtlab`` is the ``dtlab`` command."""
import sys

from dtlab.cli import main

sys.exit(main())
