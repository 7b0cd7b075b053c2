"""`python -m specdec.kit.server ...` is `specdec serve ...`."""

import sys

from . import main

sys.exit(main())
