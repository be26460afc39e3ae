"""Shared route helpers: the running server is ``app.state.server``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kvhive.server.core import KvhiveServer


def get_server(request: Request) -> KvhiveServer:
    return request.app.state.server


ServerDep = Annotated[KvhiveServer, Depends(get_server)]
