# SPDX-License-Identifier: MIT
"""Build of the optional C accelerators; everything else is declared in pyproject.toml.

Each extension is ``optional``: without a C compiler (or Python headers) the install still
succeeds and devicehost runs on its pure-Python paths, which implement the same behaviour
(``devicehost doctor`` says which are in use; ``DEVICEHOST_PURE_PYTHON=1`` turns them off).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "devicehost.vmbus._ringc",
            ["host/devicehost/vmbus/_ringc.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
        Extension(
            "devicehost.virtio._queuec",
            ["host/devicehost/virtio/_queuec.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
        Extension(
            "devicehost.virtio._driverc",
            [
                "host/devicehost/virtio/_driverc.c",
                "host/devicehost/virtio/_driverc_post.c",
                "host/devicehost/virtio/_driverc_collect.c",
            ],
            depends=["host/devicehost/virtio/_driverc.h"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ],
)
