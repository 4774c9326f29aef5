"""The names of the SASL mechanisms esmtpkit implements for AUTH (RFC 4954), and the order they are offered in.

Plain data, so settings can be checked (`esmtpkit.server.policy.Policy`) without loading the mechanisms
themselves, which live in `esmtpkit.server.sasl` and need twisted.cred.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PLAIN", "LOGIN", "CRAM_MD5", "NAMES", "DEFAULT_ORDER"]

#: PLAIN (RFC 4616).
PLAIN: Final = "PLAIN"
#: LOGIN (draft-murchison-sasl-login).
LOGIN: Final = "LOGIN"
#: CRAM-MD5 (RFC 2195).
CRAM_MD5: Final = "CRAM-MD5"

#: Every mechanism name esmtpkit implements, upper case as on the wire.
NAMES: Final[tuple[str, ...]] = (PLAIN, LOGIN, CRAM_MD5)

#: The order mechanisms are listed in the EHLO reply unless configured otherwise.
DEFAULT_ORDER: Final[tuple[str, ...]] = (PLAIN, LOGIN, CRAM_MD5)
