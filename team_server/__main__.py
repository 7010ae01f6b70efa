"""`python -m team_server --dir .team`: see the package's docstring, or --help."""

import sys

from team_server import main

sys.exit(main())
