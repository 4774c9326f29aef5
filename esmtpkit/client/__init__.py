"""esmtpkit's ESMTP/LMTP client: sessions, MX routes and delivery to a domain's mail exchangers."""
