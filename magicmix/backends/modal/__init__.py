"""The Modal backend: Dict-backed state, the GPU side, the web side; `compose` builds each."""
