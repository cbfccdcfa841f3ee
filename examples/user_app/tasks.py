"""The app's own tasks; ``tasklab tune --app ... --task user_app.thumbnail --args '[64]'``
measures worker configurations on one of them instead of a probe."""

from __future__ import annotations

import hashlib
import time

from examples.user_app.celery_app import app


@app.task(name="user_app.thumbnail")
def thumbnail(size: int = 64) -> str:
    """Pretend to resize an image: a little CPU, a little waiting on storage."""
    digest = b"image"
    for _ in range(size * 40):
        digest = hashlib.sha256(digest).digest()
    time.sleep(0.005)
    return digest.hex()[:12]
