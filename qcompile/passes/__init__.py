"""qcompile's passes, one per file. Importing this package declares every pass in it.

The registry is built from the `@register_pass` declarations of the modules found here; there is
no list of pass names to keep in step by hand.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
