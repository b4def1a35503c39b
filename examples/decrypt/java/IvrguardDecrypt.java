import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.util.HexFormat;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;

/** Reads values ivrguard encrypted: hex of nonce (12 bytes) || ciphertext || tag (16 bytes). */
public final class IvrguardDecrypt {
    private IvrguardDecrypt() {}

    /** hexKey: the same 64 hex characters ivrguard encrypts with. Java 17+. */
    public static String decrypt(String hexValue, String hexKey) throws GeneralSecurityException {
        byte[] key = HexFormat.of().parseHex(hexKey);
        byte[] raw = HexFormat.of().parseHex(hexValue);
        if (key.length != 32 || raw.length < 12 + 16) {
            throw new GeneralSecurityException("not an AES-256 key or not an ivrguard value");
        }
        Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
        cipher.init(Cipher.DECRYPT_MODE, new SecretKeySpec(key, "AES"),
                new GCMParameterSpec(128, raw, 0, 12));
        // Java's GCM takes ciphertext || tag, which is the rest of the value.
        byte[] plain = cipher.doFinal(raw, 12, raw.length - 12);
        return new String(plain, StandardCharsets.UTF_8);
    }
}
