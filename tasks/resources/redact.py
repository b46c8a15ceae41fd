"""What of a URL may be shown: the one redaction rule for logs, messages, artifacts and stored records."""

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Return `url` with user info, query string and fragment removed: where credentials hide in a URL.

    Scheme, host, port and path are kept (a trailing slash of the path is dropped). Local paths pass
    through unchanged as long as they have no `?` or `#`.

    Args:
        url: Any URL or path, possibly with `user:password@`, `?api_key=...` or `#...`.

    Returns:
        The URL safe to print; "<unparseable URL>" when it cannot be parsed at all.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. an unclosed IPv6 bracket or a port outside 0-65535
        try:
            parts, port = urlsplit(url), None
        except ValueError:
            return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
