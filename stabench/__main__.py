import sys

from .signals import exit_at_once

exit_at_once()  # first: Ctrl-C while the CLI loads, or after it returns, ends the process at once
from .cli import main  # noqa: E402  (after the Ctrl-C handler above)

sys.exit(main())
