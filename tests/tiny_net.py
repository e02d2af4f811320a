"""``TinyResNet`` (defined in tests/conftest.py) for modules that need the class at import time.

``from conftest import ...`` is ambiguous once several ``conftest.py`` files are loaded (pytest names
each of them ``conftest``), so this loads the root one by path.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_lightning_backdoor_tests_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

TinyResNet = _conftest.TinyResNet
