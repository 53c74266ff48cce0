"""``python -m federimed.cli``: the same as the ``federimed`` command."""

import sys

from federimed.cli import main

sys.exit(main())
