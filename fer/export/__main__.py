"""python -m fer.export: see fer.export.export."""

import sys

from fer.export.export import main

sys.exit(main())
