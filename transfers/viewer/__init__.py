"""The browser viewer: decoding frames, the renders kept in storage, and the viewer's pages and
data endpoints."""
