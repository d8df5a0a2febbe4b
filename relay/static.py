"""Static files in production: hashed names, compressed copies and a year's caching.

`manage.py collectstatic` (README: production) writes every file under `STATIC_ROOT` with its
content hash in its name, gzip and Brotli copies beside it and `staticfiles.json`, the map from
names to hashed names; WhiteNoise then serves those with `Cache-Control: max-age=31536000,
immutable`. Before `collectstatic` has run (the tests, a fresh checkout started without `make
run`) the map is missing, and pages name the source files, which WhiteNoise serves from the
source folders (WHITENOISE_USE_FINDERS) with a short cache life.

The settings used to pick this storage only when `staticfiles.json` already existed, and
collectstatic under the other storage never wrote it: production got no hashed names, no
compressed copies and one minute's caching (issue 18).
"""

from __future__ import annotations

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    manifest_strict = False

    def stored_name(self, name: str) -> str:
        if not self.hashed_files:
            # Not collected yet: the source file's own name.
            return name
        return str(super().stored_name(name))
