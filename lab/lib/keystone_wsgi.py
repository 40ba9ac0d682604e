"""keystone.wsgi.api for gunicorn.

Loaded inside the keystone venv: keystone's oslo.config parses sys.argv at import
time and would choke on gunicorn's own command line (-b, -k, ...), so hide it.
"""

import importlib
import sys
from typing import Any

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    application: Any = importlib.import_module("keystone.wsgi.api").application
finally:
    sys.argv = _argv
