import sys

from trimserve.cli import main

sys.exit(main())
