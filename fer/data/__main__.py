"""python -m fer.data [PATH]: see fer.data.cli."""

import sys

from fer.data.cli import main

sys.exit(main())
