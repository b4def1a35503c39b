// Test driver for examples/decrypt/java/IvrguardDecrypt.java (run by
// tests/decrypt_snippets.rs): the key in $SNIPPET_KEY, one hex value per
// stdin line; prints "ok <plaintext>" or "err <exception class>" per line.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

public final class DecryptCli {
    public static void main(String[] args) throws Exception {
        String key = System.getenv("SNIPPET_KEY");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            try {
                out.println("ok " + IvrguardDecrypt.decrypt(line, key));
            } catch (Exception e) {
                out.println("err " + e.getClass().getName());
            }
        }
    }
}
