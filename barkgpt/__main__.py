import sys

from barkgpt.cli import main

sys.exit(main())
