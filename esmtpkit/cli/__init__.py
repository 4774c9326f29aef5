"""Ring 3, the command line: ``twistd esmtpkit`` options and the service they build."""
