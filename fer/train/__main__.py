"""python -m fer.train: see fer.train.cli."""

import sys

from fer.train.cli import main

sys.exit(main())
