import sys

from ctxext.cli.main import main

sys.exit(main())
