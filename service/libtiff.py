"""Keeps the libtiff that Pillow decodes TIFFs with from writing to the server's stderr.

libtiff reports what it finds wrong in a file through process-wide handlers, whose
default prints a line to stderr for each complaint: "LZWDecode: Strip 0 not terminated
with EOI code" for a file cut short, dozens of "Fax4Decode: Bad code word at line …"
for one corrupt fax image. Those are a client's bytes talking in the server's log, as
often as the client likes. Pillow turns off the warning handler only (and offers no
switch for the other); it learns of a failure from libtiff's return codes, never
from the messages, so a file still fails, with Pillow's error, when the handlers are
gone.
"""

from __future__ import annotations

import ctypes

from PIL import _imaging  # Pillow's C module, which links libtiff

# Passing NULL to each of these leaves libtiff nothing to print with.
_SETTERS = (
    "TIFFSetErrorHandler",
    "TIFFSetErrorHandlerExt",
    "TIFFSetWarningHandler",
    "TIFFSetWarningHandlerExt",
)


def silence() -> bool:
    """Remove libtiff's error and warning handlers for the whole process; whether it was
    done. Pillow's libtiff is found through Pillow's C module, whose symbol lookup
    searches the libraries it links (its wheel bundles a libtiff under pillow.libs/, a
    build from source links the system's): the copy that decodes, not another one.
    Where it cannot be found (a Pillow built without libtiff, a platform whose lookup
    does not search a module's libraries) nothing is changed."""
    try:
        imaging = ctypes.CDLL(_imaging.__file__)
        setters = [getattr(imaging, name) for name in _SETTERS]
    except (OSError, AttributeError, TypeError):  # not loadable, or no such symbol
        return False
    for setter in setters:
        setter.argtypes = [ctypes.c_void_p]
        setter.restype = ctypes.c_void_p  # the previous handler, not needed
        setter(None)
    return True
