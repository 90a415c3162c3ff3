"""URL normalisers, each named by what it is for. They differ on purpose:

- `normalise_for_fetch`: the form harvest records and visits a URL in (candidates' `url`, the page
  crawl's seen-set). It only removes what never reaches the server -- the fragment -- and what is
  case-insensitive by definition (scheme, host); "http://h" and "http://h/" are one page. Everything
  else, the query's order included, is kept: a server may treat it as meaningful.
- `normalise_for_dedup`: the key under which dedup calls two image URLs the same resource. It goes
  further: the default port is dropped and query parameters are sorted.

And `redact_url` / `redact_urls`: the form a URL is shown in wherever it leaves the process (MLflow
params and tags, log lines, error messages): credentials in the userinfo (``user:password@``) become
``***@`` and the values of query (and fragment) parameters whose name looks secret become ``***``
(see `is_secret_param`). Everything else is kept as written, so the URL still says where it points.
"""

from __future__ import annotations

import re
from urllib.parse import (
    parse_qsl,
    unquote_plus,
    urldefrag,
    urlencode,
    urlsplit,
    urlunsplit,
)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_for_fetch(url: str) -> str:
    """Drop the fragment; lower-case scheme and host; an empty path is "/"."""
    parts = urlsplit(urldefrag(url.strip())[0])
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def normalise_for_dedup(url: str) -> str:
    """Same resource, same string: lower-case scheme and host, no default port, no fragment, query
    parameters sorted."""
    parts = urlsplit(str(url).strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


# ----------------------------------------------------------------------------- redaction
REDACTED = "***"
# parameter names (lower-case, "-" as "_") whose value is a secret wherever they appear
_SECRET_NAMES = frozenset({
    "key", "sig", "pwd", "pass", "auth", "authorization", "bearer", "code", "jwt", "otp", "hmac", "ticket", "sid",
})
# ... and names that contain one of these: access_token, X-Amz-Signature / X-Amz-Credential /
# X-Amz-Security-Token, X-Goog-Signature / X-Goog-Credential, AWSAccessKeyId, client_secret, api_key...
_SECRET_PARTS = ("token", "secret", "passw", "signature", "credential", "apikey", "api_key", "accesskey",
                 "access_key", "private_key", "session", "auth_")
# an Azure SAS token is its signature plus the fields it signs: redacted together when `sig` is there
_AZURE_SAS = frozenset({"sv", "ss", "srt", "sp", "se", "st", "spr", "sr", "si", "sdd", "skoid", "sktid", "skt",
                        "ske", "sks", "skv", "saoid", "suoid", "scid", "sip", "sig"})
_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>`]+""")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter of this name carries a secret (see `redact_url`)."""
    n = unquote_plus(name).strip().lower().replace("-", "_")
    return n in _SECRET_NAMES or any(part in n for part in _SECRET_PARTS)


def _redact_params(text: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***``: values of secret-looking names replaced, the rest as written
    (";" separates parameters too, as some servers take it)."""
    pairs = re.split(r"([&;])", text)
    seps, pairs = pairs[1::2], pairs[0::2]
    names = [unquote_plus(p.split("=", 1)[0]).strip().lower() for p in pairs]
    sas = "sig" in names  # an Azure SAS: its signed fields go with the signature
    out = []
    for pair, name in zip(pairs, names):
        if "=" in pair and (is_secret_param(name) or (sas and name in _AZURE_SAS)):
            pair = f"{pair.split('=', 1)[0]}={REDACTED}"
        out.append(pair)
    return "".join(p + s for p, s in zip(out, [*seps, ""]))


def redact_url(url: str) -> str:
    """`url` with its secrets replaced: ``https://u:p@host/x?token=abc&page=2`` ->
    ``https://***@host/x?token=***&page=2``.

    The userinfo (user name and password alike: a user name is often a token) becomes ``***``; the
    values of query and fragment parameters named like a secret (token, access_token, key, api_key,
    sig, signature, secret, password, pwd, auth, credential(s), session, code, X-Amz-Signature /
    Credential / Security-Token, X-Goog-Signature / Credential, ...; `is_secret_param`) become
    ``***``, as do all the signed fields of an Azure SAS token (sv, se, sp, ... next to a sig). Other
    parameters, their order and encoding are kept. A string urlsplit cannot parse is returned
    unchanged; one without secrets comes back equal."""
    try:
        parts = urlsplit(url)
    except (ValueError, TypeError):  # e.g. an unclosed IPv6 bracket
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = _redact_params(parts.query) if parts.query else parts.query
    fragment = _redact_params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing secret: exactly as given (urlunsplit would normalise a little)
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_urls(text: str) -> str:
    """`redact_url` applied to every ``scheme://...`` in a piece of text (a log line, a message, a
    param value holding a list of URLs)."""
    if "://" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        url = m.group(0)
        core = url.rstrip(".,;:!?)]}")  # sentence punctuation after a URL is not part of it
        return redact_url(core) + url[len(core):]

    return _URL_IN_TEXT.sub(one, text)
