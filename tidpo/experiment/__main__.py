"""``python -m tidpo.experiment``: see :mod:`tidpo.experiment.command`."""

import sys

from tidpo.experiment.command import main

if __name__ == "__main__":
    sys.exit(main())
