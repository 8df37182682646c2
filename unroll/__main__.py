import sys

from unroll.cli import main

sys.exit(main())
