import sys

from vlm_client.webui.app import main

sys.exit(main())
