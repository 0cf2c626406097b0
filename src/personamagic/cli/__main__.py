"""`python -m personamagic.cli ...` runs the `personamagic` command."""

import sys

from .main import main

sys.exit(main())
