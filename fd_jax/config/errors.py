"""The one exception a bad setting raises (kept apart so that any module can raise it without importing the
rest of the config machinery)."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field (`config.a.b`), the value and the fix."""
