"""`python -m analysis`: every report figure (analysis/report.py); `python -m analysis.leaderboard`: the table."""

import sys

from analysis.report import main

sys.exit(main())
