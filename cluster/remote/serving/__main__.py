"""`python3 serving.pyz ...` and `python3 -m cluster.remote.serving ...` both land here."""

import sys

from cluster.remote.serving.main import main

sys.exit(main(sys.argv[1:]))
