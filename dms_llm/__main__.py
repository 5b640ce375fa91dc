"""``python -m dms_llm ...`` (also ``accelerate launch -m dms_llm prune ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
