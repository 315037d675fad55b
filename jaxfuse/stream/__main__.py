import sys

from jaxfuse.stream.cli import main

sys.exit(main())
