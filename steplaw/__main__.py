import sys

from steplaw.cli import main

sys.exit(main())
