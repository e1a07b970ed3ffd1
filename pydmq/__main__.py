"""``python -m pydmq``: the same as the ``pydmq`` command."""

import sys

from pydmq.cli import main

sys.exit(main())
