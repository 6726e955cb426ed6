"""``python -m devicehost.worker``: a device worker (:mod:`devicehost.worker.child`)."""

from __future__ import annotations

import sys

from devicehost.worker.child import main

if __name__ == "__main__":
    sys.exit(main())
