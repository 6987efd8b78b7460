"""The wire contract, loaded once.

``dagserve_thrift`` is the thriftpy2 module built from ``dagserve.thrift``.  It is loaded
with a fixed ``module_name`` so that its structs and exceptions pickle (thriftpy2's rule:
"objects inside may only be pickled if module_name was provided").
"""

from __future__ import annotations

from pathlib import Path

import thriftpy2

IDL_PATH = Path(__file__).with_name("dagserve.thrift")

dagserve_thrift = thriftpy2.load(str(IDL_PATH), module_name="dagserve_thrift")

__all__ = ["IDL_PATH", "dagserve_thrift"]
