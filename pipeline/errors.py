"""The errors of the Python API, under the name the docs give them: ``wildreid.errors.WildreidError``.

They live in ``wildreid.core.errors``, which the shard and store packages import without the pipeline.
"""

from wildreid.core.errors import *  # noqa: F403
