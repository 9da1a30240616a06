import sys

from snapgen_app.cli import main

sys.exit(main())
