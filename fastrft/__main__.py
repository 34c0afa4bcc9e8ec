import sys

from fastrft.cli import main

sys.exit(main())
