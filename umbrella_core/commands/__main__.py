"""``python -m umbrella_core.commands``: the ``umbrella`` command (job scripts run it so)."""

import sys

from umbrella_core.commands.main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
