"""python -m fer.evaluate: see fer.evaluate.evaluate."""

import sys

from fer.evaluate.evaluate import main

sys.exit(main())
