"""The Relay desktop uploader: `relay send FOLDER` sends a folder or a patient's CD to Relay.

It runs on the sending facility's PCs and talks to the server only through the public upload
API (transfers/api.py), so it imports nothing from Django and needs only pydicom, httpx and tqdm.
"""

from __future__ import annotations

__version__ = "0.1.0"
