"""The embedded demo: a tiny pretrained llama (`assets/base`), the list-reversal task, the end-to-end run."""
