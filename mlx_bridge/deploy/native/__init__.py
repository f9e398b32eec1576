"""The native PyTorch model: HF config parsing (`config`), layers, rope, weight loading, `Transformer`."""
