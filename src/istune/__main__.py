import sys

from istune.cli import main

sys.exit(main())
