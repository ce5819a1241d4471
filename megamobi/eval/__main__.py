import sys

from megamobi.eval.cli import main

sys.exit(main())
