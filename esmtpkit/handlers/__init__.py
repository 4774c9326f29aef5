"""Handlers to use or subclass: `MessageHandler` gives every verb its default reply."""

from .base import MessageHandler

__all__ = ["MessageHandler"]
