from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def decrypt(hex_value: str, hex_key: str) -> str:
    """Decrypts one value ivrguard encrypted: lowercase hex of
    nonce (12 bytes) || ciphertext || tag (16 bytes), AES-256-GCM, key as 64 hex characters."""
    raw = bytes.fromhex(hex_value)
    if len(raw) < 28:
        raise ValueError("not an ivrguard ciphertext")
    return AESGCM(bytes.fromhex(hex_key)).decrypt(raw[:12], raw[12:], None).decode("utf-8")
