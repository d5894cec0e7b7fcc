"""Where tokencompress keeps what it builds: the cache of prepared corpora and reconstructors."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the cache root (default ``~/.cache/tokencompress``).
CACHE_ENV_VAR = "TOKENCOMPRESS_HOME"


def cache_root() -> Path:
    """Return the root folder of the tokencompress cache.

    It is ``$TOKENCOMPRESS_HOME`` when set, else ``$XDG_CACHE_HOME/tokencompress``, else
    ``~/.cache/tokencompress``. The folder is not created here.

    :return: the cache root
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tokencompress"
