"""`python -m personamagic.evaluation images|run ...` (see `personamagic.evaluation.cli`)."""

import sys

from .cli import main

sys.exit(main())
