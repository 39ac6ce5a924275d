"""A Redis client for the index store: URL, password and TLS from arguments or the environment, binary-safe.

The password never has to be in a URL or on a command line: ``$HLM_REDIS_PASSWORD`` (a Kubernetes Secret) wins
over one in the URL. ``rediss://`` enables TLS, verified against ``$HLM_REDIS_CA`` (a private CA) or the system CAs.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

# scheme://user:password@host: the password runs to the last '@' before the path (greedy: an unescaped '@' in a
# password must not leave its tail in the clear)
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (redis://user:pass@h -> redis://user:***@h),
    for logs, saved configs and error messages."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


def redis_client(url: str | None = None, *, password: str | None = None, ssl_ca: str | None = None) -> redis.Redis:
    """A binary-safe client for ``url`` (else ``$HLM_REDIS_URL``, else ``redis://127.0.0.1:6379/0``).

    ``password`` (else ``$HLM_REDIS_PASSWORD``) overrides one in the URL; ``rediss://`` enables TLS, verified
    against ``ssl_ca`` (else ``$HLM_REDIS_CA``: a CA bundle path, for a private CA) or the system CAs. Socket
    timeouts are 5 s.
    """
    url = url or os.environ.get("HLM_REDIS_URL") or "redis://127.0.0.1:6379/0"
    password = password or os.environ.get("HLM_REDIS_PASSWORD") or None
    ssl_ca = ssl_ca or (os.environ.get("HLM_REDIS_CA") if url.startswith("rediss://") else None) or None
    kwargs: dict = {"decode_responses": False, "socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = "required"
        if ssl_ca:
            kwargs["ssl_ca_certs"] = ssl_ca
    elif ssl_ca:
        raise ValueError(f"ssl_ca was given but {redact(url)!r} is not a rediss:// (TLS) URL")
    import redis  # here, not at the top: every config import (each Ray worker's) would pay ~0.3 s for it

    pool = redis.ConnectionPool.from_url(url, **kwargs)
    if password:
        pool.connection_kwargs["password"] = password  # from_url lets the URL win; an explicit password wins here
    return redis.Redis(connection_pool=pool)
