// Test driver for examples/decrypt/go/decrypt.go (run by
// tests/decrypt_snippets.rs): the key in $SNIPPET_KEY, one hex value per
// stdin line; prints "ok <plaintext>" or "err <message>" per line.
package main

import (
	"bufio"
	"fmt"
	"os"

	"snippettest/decrypt"
)

func main() {
	key := os.Getenv("SNIPPET_KEY")
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		plain, err := decrypt.Decrypt(in.Text(), key)
		if err != nil {
			fmt.Println("err", err)
		} else {
			fmt.Println("ok", plain)
		}
	}
}
