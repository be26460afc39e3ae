"""HTTP routers; each module exposes ``router``.  ``ROUTERS`` lists what the app mounts."""

from kvhive.http.routes import cache, info

ROUTERS = [info.router, cache.router]
