"""Built-in rewrite passes, one module each; importing this package registers them."""
