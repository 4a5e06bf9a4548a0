"""`python -m tray`: the same as `vasa-avatar-tray`."""

import sys

from tray.app import main

sys.exit(main())
