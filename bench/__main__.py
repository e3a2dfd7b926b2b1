"""``python -m fusedpg.bench`` is ``fusedpg bench``."""
import sys

from . import main

sys.exit(main())
