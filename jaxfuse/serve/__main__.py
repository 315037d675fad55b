import sys

from jaxfuse.serve.cli import main

sys.exit(main())
