"""`python -m trimserve.cli ...`: the same as the `trimserve` command."""

import sys

from trimserve.cli import main

sys.exit(main())
