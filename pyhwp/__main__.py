"""`python -m pyhwp ...` runs the command line."""

import sys

from pyhwp.cli import main

sys.exit(main())
