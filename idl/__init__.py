"""The wire contract, loaded once.

``dagserve_thrift`` is the thriftpy2 module built from ``dagserve.thrift`` (the inference
service), ``admin_thrift`` the one built from ``admin.thrift`` (the lifecycle service, on its
own port).  Each is loaded with a fixed ``module_name`` so that its structs and exceptions
pickle (thriftpy2's rule: "objects inside may only be pickled if module_name was provided").
"""

from __future__ import annotations

from pathlib import Path

import thriftpy2

IDL_PATH = Path(__file__).with_name("dagserve.thrift")
ADMIN_IDL_PATH = Path(__file__).with_name("admin.thrift")

dagserve_thrift = thriftpy2.load(str(IDL_PATH), module_name="dagserve_thrift")
admin_thrift = thriftpy2.load(str(ADMIN_IDL_PATH), module_name="admin_thrift")

__all__ = ["ADMIN_IDL_PATH", "IDL_PATH", "admin_thrift", "dagserve_thrift"]
