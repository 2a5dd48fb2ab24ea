"""python -m fastnet.cli: the same command as fastnet and python -m fastnet."""

import sys

from fastnet.cli import main

sys.exit(main())
