"""python -m gateway: serve the public API until SIGINT/SIGTERM (settings from the environment)."""

import asyncio
import sys

from gateway.server import main
from gateway.settings import SettingsError

try:
    asyncio.run(main())
except SettingsError as exc:
    print(f"gateway: {exc}", file=sys.stderr)
    sys.exit(2)
