"""``python -m distill`` (and ``accelerate launch -m distill``) runs the ``distill`` CLI."""

import sys

from distill.cli import main

sys.exit(main())
