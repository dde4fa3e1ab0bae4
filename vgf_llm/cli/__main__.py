"""``python -m vgf_llm.cli ...`` = ``vgf-llm ...`` (what the distributed launchers re-run)."""

import sys

from vgf_llm.cli import main

sys.exit(main())
