"""Thin integrations of the IST core: the Hugging Face Trainer callback and a plain PyTorch loop."""
