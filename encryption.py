"""Secrets at rest (upstream API keys): Fernet tokens under TOKENOPEN_ENCRYPTION_KEY.

TOKENOPEN_ENCRYPTION_KEY holds one or more Fernet keys, comma-separated: the first
encrypts, all of them decrypt (rotation). A key derived from the secret key always
decrypts too, and encrypts when no encryption key is configured. Values stored before
encryption existed (plain text) still read back as they are until they are re-encrypted.
"""
import base64
import binascii

from flask import current_app

# cryptography is imported where a key is built or used, not here: loading it costs an admin
# CLI start 0.06 s, and most commands never touch an upstream key.

TOKEN_VERSION = 0x80  # the first byte of every Fernet token ("gAAAAA..." in base64)
_HKDF_SALT = b"tokenopen"
_HKDF_INFO = b"tokenopen channel api keys v1"


class SecretUnreadable(ValueError):
    """A stored token that none of the configured keys can decrypt."""


def derived_key(secret_key):
    """The Fernet key HKDF-SHA256 derives from the app's secret key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    raw = secret_key.encode() if isinstance(secret_key, str) else bytes(secret_key)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return base64.urlsafe_b64encode(hkdf.derive(raw))


def configured_keys(encryption_key, secret_key):
    """The Fernet keys in use, the encrypting one first. ValueError names a malformed entry."""
    from cryptography.fernet import Fernet
    keys = []
    for number, text in enumerate((encryption_key or "").split(","), 1):
        text = text.strip()
        if not text:
            continue
        try:
            Fernet(text)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"TOKENOPEN_ENCRYPTION_KEY entry {number} is not a Fernet key (44 url-safe "
                f"base64 characters); make one with: python -c \"from cryptography.fernet "
                f"import Fernet; print(Fernet.generate_key().decode())\"") from None
        keys.append(text.encode())
    keys.append(derived_key(secret_key))  # always readable, so adding a key loses nothing
    return keys


class SecretBox:
    """Encrypts with the first key, decrypts with any; knows plain text from a token."""

    def __init__(self, keys):
        from cryptography.fernet import Fernet, InvalidToken, MultiFernet
        self._invalid = InvalidToken
        self.primary = Fernet(keys[0])
        self.fernet = MultiFernet([Fernet(k) for k in keys])
        # token -> plain text: the routing cache reloads channels every CACHE_TTL seconds,
        # and a decryption costs ~0.1 ms; the plain keys are in that cache anyway.
        self._decrypted = {}

    def encrypt(self, text):
        """`text` as a Fernet token; '' stays '' (nothing to hide)."""
        return self.fernet.encrypt(text.encode()).decode() if text else ""

    def decrypt(self, stored):
        """The plain text of a stored value; a legacy plain-text value comes back unchanged."""
        plain = self._decrypted.get(stored)
        if plain is None:
            if not looks_encrypted(stored):
                return stored or ""
            try:
                plain = self.fernet.decrypt(stored.encode()).decode()
            except self._invalid:
                raise SecretUnreadable(
                    "a stored secret cannot be decrypted with TOKENOPEN_ENCRYPTION_KEY or the "
                    "secret key (was one changed without `flask --app app channels reencrypt`?)"
                ) from None
            if len(self._decrypted) >= 1024:
                self._decrypted.clear()
            self._decrypted[stored] = plain
        return plain

    def is_current(self, stored):
        """True when `stored` needs no re-encryption: empty, or a token of the first key."""
        if not stored:
            return True
        if not looks_encrypted(stored):
            return False
        try:
            self.primary.decrypt(stored.encode())
        except self._invalid:
            return False
        return True


def looks_encrypted(stored):
    """True for a Fernet token; an upstream key in plain text never has this shape."""
    if not stored or not stored.startswith("gAAAAA"):
        return False
    try:
        raw = base64.urlsafe_b64decode(stored.encode())
    except (ValueError, binascii.Error):
        return False
    return len(raw) >= 57 and raw[0] == TOKEN_VERSION


def secret_box(app=None):
    """The app's SecretBox, rebuilt only when the configured keys change."""
    app = app or current_app
    config = (app.config.get("ENCRYPTION_KEY"), app.config["SECRET_KEY"])
    cached = app.extensions.get("tokenopen_secret_box")
    if cached is None or cached[0] != config:
        cached = (config, SecretBox(configured_keys(*config)))
        app.extensions["tokenopen_secret_box"] = cached
    return cached[1]
