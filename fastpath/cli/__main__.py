"""`python -m fastpath.cli`: the `fastpath` command."""

import sys

from fastpath.cli import main

sys.exit(main())
