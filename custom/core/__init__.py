"""Layer 0: conventions, errors, atomic writes, option parsing, names on disk; imports nothing of ``custom``."""
