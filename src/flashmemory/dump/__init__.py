"""Offline dumps of a language model decoding over long prompts, the training data of the Memory Indexer."""
