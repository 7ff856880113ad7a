"""``python -m umbrella_core.launch agent|release-lock``: the pieces the job script runs."""

import sys

from umbrella_core.launch.agent import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
