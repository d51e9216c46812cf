"""Untrusted input: where layout images come from, the SSRF guard, image decoding."""
