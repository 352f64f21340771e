"""``python -m gateway.cli``: the same as the ``ev-gateway`` command."""

import sys

from gateway.cli import main

sys.exit(main())
