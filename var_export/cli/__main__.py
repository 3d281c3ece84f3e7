import sys

from var_export.cli import main

sys.exit(main())
