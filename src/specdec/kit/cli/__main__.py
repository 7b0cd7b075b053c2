"""`python -m specdec.kit.cli ...` is `specdec ...` (the OpenBLAS re-exec runs this)."""

import sys

from specdec.kit.cli import main

sys.exit(main())
