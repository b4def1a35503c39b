// Package decrypt reads values ivrguard encrypted: lowercase hex of
// nonce (12 bytes) || ciphertext || tag (16 bytes), AES-256-GCM, no AAD.
package decrypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"errors"
)

// Decrypt returns the plaintext of one value; hexKey is the same 64 hex
// characters ivrguard encrypts with.
func Decrypt(hexValue, hexKey string) (string, error) {
	key, err := hex.DecodeString(hexKey)
	if err != nil || len(key) != 32 {
		return "", errors.New("the key must be 64 hex characters")
	}
	raw, err := hex.DecodeString(hexValue)
	if err != nil {
		return "", err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return "", err
	}
	gcm, err := cipher.NewGCM(block) // 12-byte nonce, 16-byte tag
	if err != nil {
		return "", err
	}
	if len(raw) < gcm.NonceSize()+gcm.Overhead() {
		return "", errors.New("not an ivrguard value: too short")
	}
	// Go's Open takes ciphertext || tag, which is the rest of the value.
	plain, err := gcm.Open(nil, raw[:gcm.NonceSize()], raw[gcm.NonceSize():], nil)
	if err != nil {
		return "", err
	}
	return string(plain), nil
}
