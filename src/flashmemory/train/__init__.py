"""Backbone-free training and evaluation of the Memory Indexer from dump folders."""
