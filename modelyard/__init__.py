"""Modelyard's Python SDK (`Client`, `AsyncClient`) and command line."""

from modelyard.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
