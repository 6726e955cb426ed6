"""A third-party plugin whose import raises."""

raise RuntimeError("dh_broken refuses to import")
