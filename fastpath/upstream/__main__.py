"""`python -m fastpath.upstream`: the same as `fastpath upstream`."""

import sys

from fastpath.upstream import main

sys.exit(main())
