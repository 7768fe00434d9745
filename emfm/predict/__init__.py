"""Blockwise prediction over volumes larger than memory (``emfm predict``)."""
