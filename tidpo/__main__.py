"""``python -m tidpo``: the ``tidpo`` command line (:mod:`tidpo.cli`)."""

import sys

from tidpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
