"""``python -m tidpo.cli``: the same as ``python -m tidpo`` and the ``tidpo`` command."""

import sys

from tidpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
