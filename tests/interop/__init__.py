"""Interop: real SMTP clients (smtplib, swaks, curl, msmtp, Postfix, smtp-source) against a real `twistd esmtpkit`."""
