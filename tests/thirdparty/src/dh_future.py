"""A third-party device written for host API 2: the host must refuse it without importing it."""

raise AssertionError("dh_future was imported although it declares another host API")
