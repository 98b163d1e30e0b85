"""Typed, user-facing errors.

Every error the engine raises on bad input derives from :class:`AudioScribeError`, so the app can show the message
as-is and tests can assert the exact type. Messages say what was wrong and what to do about it.
"""
from __future__ import annotations


class AudioScribeError(Exception):
    """Base class of every error AudioScribe raises deliberately."""


class ConfigError(AudioScribeError, ValueError):
    """A setting is unknown, has the wrong type or an impossible value."""


# --------------------------------------------------------------------------------------------------------------------
# audio


class AudioError(AudioScribeError, ValueError):
    """Base class of audio loading errors."""


class EmptyAudioError(AudioError):
    """The input holds no samples (empty file, zero-length array, zero bytes)."""


class UndecodableAudioError(AudioError):
    """The bytes could not be decoded as audio (corrupt or not audio at all)."""


class UnsupportedFormatError(AudioError):
    """The container needs FFmpeg (m4a, mp4, webm, ...) and FFmpeg is not installed."""


class NonFiniteAudioError(AudioError):
    """The samples contain NaN or infinity."""


class AudioTooLongError(AudioError):
    """The audio is longer than the configured limit."""


# --------------------------------------------------------------------------------------------------------------------
# models and data


class ModelLoadError(AudioScribeError, RuntimeError):
    """A model or checkpoint could not be found or does not match the expected layout."""


class DatastoreError(AudioScribeError, ValueError):
    """A datastore is missing, malformed, or built with another CLAP model."""


class ClassifierInputError(AudioScribeError, ValueError):
    """Class names or prompt templates are unusable (empty, too many, malformed template)."""


class NotReadyError(AudioScribeError, RuntimeError):
    """What the request needs is still loading in the background (e.g. the datastore is being built); try again."""
