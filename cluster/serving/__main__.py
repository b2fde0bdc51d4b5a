"""`python3 serving.pyz ...` and `python3 -m cluster.serving ...` both land here."""

import sys

from cluster.serving.main import main

sys.exit(main(sys.argv[1:]))
