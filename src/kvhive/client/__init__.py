"""kvhive's own light client (no torch): a blocking DEALER speaking the same frames."""

from kvhive.client.sync import KvhiveClient, RemoteError

__all__ = ["KvhiveClient", "RemoteError"]
